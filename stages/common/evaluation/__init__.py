"""Held-out evaluation: the synth scorer `prism eval` uses, and the greedy evaluation a training stage runs every
N steps (split over ranks in lockstep), with the pick of the best checkpoint."""
