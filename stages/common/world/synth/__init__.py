"""synth: the built-in synthetic visual-reasoning benchmark and its oracle teacher.

Small, high-contrast scenes (shapes on a 3x3 grid, or a colour-coded bar chart) at 64x64 by default,
with questions that need perception and a short computation, so the tiny Qwen3-VL can learn them on
a CPU. Everything is a deterministic function of (split, index, seed); the test split owns a fixed
slice of the scene-hash space, so train and test never share a scene.

    samples = load("synth:test:200:d2")
    demo = oracle_demo(samples[0])                         # clean: Teacher(caption, think, answer)
    noisy = oracle_demo(samples[0], caption_error_rate=0.2, reasoning_slip_rate=0.2)
    caption_accuracy(demo.caption, samples[0])["f1"]       # 1.0
    clean, drifted = arms("train", 2000)                   # same problems; systematic demo errors in one
"""

import dataclasses

from stages.common.contract.samples import Sample

from .benchmark import SynthSpec, generate, parse_spec
from .caption_check import caption_accuracy
from .drift import DEFAULT_DRIFT, DRIFTS, IMAGE_ONLY_DRIFT, Drift, arms, drifted_demo
from .oracle import caption_for, oracle_demo, with_oracle_demos
from .scene import render, scene_hash, split_of
from .tasks import TASKS

__all__ = ["DEFAULT_DRIFT", "DRIFTS", "IMAGE_ONLY_DRIFT", "TASKS", "Drift", "SynthSpec", "arms", "caption_accuracy", "caption_for", "drifted_demo", "generate", "load", "oracle_demo", "with_oracle_demos",
           "parse_spec", "render", "scene_hash", "split_of"]


def load(spec: str, seed: int = 0) -> list[Sample]:
    """The problems a synth spec names, with the oracle's demonstrations, or with the drifted demonstrator's
    (`:drift`, or `:drift-swap`: green and blue swapped both ways, seen only in the image). `seed` (the run's) draws the problems and the drift's realisation, unless the spec pins its
    own (`:seedK`). Here rather than in benchmark.py: drift builds on benchmark, not the other way round."""
    s = parse_spec(spec)
    seed = s.seed if s.seed is not None else seed
    samples = generate(s.split, s.n, seed=seed, tasks=s.tasks, difficulty=s.difficulty, first=s.first)
    if s.drift:
        samples = [dataclasses.replace(x, teacher=drifted_demo(x, DRIFTS[s.drift_kind], seed)) for x in samples]
    return samples
