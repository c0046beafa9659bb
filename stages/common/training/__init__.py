"""The training runtime: accelerate and backend setup, optimiser and schedule, save and resume, collectives and
the split of groups over ranks."""
