"""Generating synth samples, and the `synth[:split][:n][:dK][:task+task]` data-source spec."""

from __future__ import annotations

import random
from dataclasses import dataclass

from stages.common.contract.errors import UsageError
from stages.common.contract.samples import Sample

from .scene import png_bytes, render, split_of
from .tasks import FAMILIES, TASKS

SPLITS = ("train", "test")
LEVELS = (1, 2, 3)
DEFAULT_N = 512
DEFAULT_IMAGE_SIZE = 64


def check_args(split: str, n: int, tasks, difficulty) -> tuple[str, ...]:
    if split not in SPLITS:
        raise UsageError(f"synth split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not isinstance(n, int) or n < 0:
        raise UsageError(f"synth sample count must be a non-negative integer, not {n!r}")
    if difficulty is not None and difficulty not in LEVELS:
        raise UsageError(f"synth difficulty must be 1, 2 or 3, not {difficulty!r}")
    if isinstance(tasks, str):  # "count_color+chart_diff", as in a spec
        tasks = tasks.split("+")
    names = tuple(tasks) if tasks else TASKS
    unknown = [t for t in names if t not in FAMILIES]
    if unknown:
        raise UsageError(f"unknown synth task {unknown[0]!r} (known: {', '.join(TASKS)})")
    return names


def make_sample(split: str, index: int, seed: int, task: str, level: int, image_size: int) -> Sample:
    # One rng per sample: sample i does not depend on n, so a smaller n gives a prefix.
    rng = random.Random(f"synth/{seed}/{split}/{index}")
    problem = FAMILIES[task].build(rng, level)
    while split_of(problem.scene) != split:  # the scene hash decides the split
        problem = FAMILIES[task].build(rng, level)
    return Sample(
        # the seed is part of the id when it is not 0: other seeds draw other problems
        id=f"synth-{split}-{index:06d}" if seed == 0 else f"synth-s{seed}-{split}-{index:06d}",
        images=[png_bytes(render(problem.scene, image_size))],
        question=problem.question,
        answer=problem.answer,
        choices=problem.choices,
        task=task,
        source="synth",
        meta={"difficulty": level, "scene": problem.scene, "split": split, "query": problem.query,
              "image_size": image_size},
    )


def generate(split: str, n: int, seed: int = 0, tasks=None, difficulty: int | None = None,
             image_size: int = DEFAULT_IMAGE_SIZE, first: int = 0) -> list[Sample]:
    """n samples of a split, indices first .. first+n-1; the same arguments give byte-identical samples.

    Tasks take turns (sample i is tasks[i % len(tasks)]); without a fixed difficulty the levels
    1, 2, 3 take turns too, so every task meets every level. Sample i is the same whatever first and n
    are, so first=1500 gives the problems a longer load would hold at 1500 and up.
    """
    names = check_args(split, n, tasks, difficulty)
    if not isinstance(first, int) or first < 0:
        raise UsageError(f"synth first index must be a non-negative integer, not {first!r}")
    samples = []
    for i in range(first, first + n):
        level = difficulty or LEVELS[(i // len(names)) % len(LEVELS)]
        samples.append(make_sample(split, i, seed, names[i % len(names)], level, image_size))
    return samples


@dataclass(frozen=True)
class SynthSpec:
    split: str = "train"
    n: int = DEFAULT_N
    difficulty: int | None = None
    tasks: tuple[str, ...] | None = None
    drift: bool = False  # demonstrations by the drifted demonstrator (synth/drift.py) instead of the oracle
    drift_kind: str = "drift"  # drift: the default habits; drift-swap: green<->blue only (synth/drift.py DRIFTS)
    first: int = 0       # the index of the first problem (fromK): a slice that skips problems 0..K-1
    seed: int | None = None  # seedK pins the problems and the drift to seed K; None: the run's seed


SPEC_HELP = "synth[:train|test][:N][:d1|d2|d3][:task+task...][:drift|:drift-swap][:fromK][:seedK]"


def parse_spec(spec: str) -> SynthSpec:
    """Parse "synth", "synth:test", "synth:train:2000", "synth:test:200:d2", "synth:test:count_color",
    "synth:train:2000:drift", "synth:test:2000:from1500" (problems 1500-3499), "synth:train:2000:seed3"
    (seed 3's problems and drift whatever the run's --seed)."""
    head, *parts = str(spec).strip().split(":")
    if head != "synth":
        raise UsageError(f"{spec!r} is not a synth data spec (expected {SPEC_HELP})")
    found: dict = {}

    def put(key, value, part):
        if key in found:
            raise UsageError(f"synth spec {spec!r} gives the {key} twice (at {part!r}); expected {SPEC_HELP}")
        found[key] = value

    for part in parts:
        if part in SPLITS:
            put("split", part, part)
        elif part.isdigit():
            if int(part) == 0:
                raise UsageError(f"synth spec {spec!r} asks for 0 samples")
            put("n", int(part), part)
        elif len(part) == 2 and part[0] == "d" and part[1] in "123":
            put("difficulty", int(part[1]), part)
        elif part in ("drift", "drift-swap"):
            put("drift", True, part)
            found["drift_kind"] = part
        elif part.startswith("from") and part[4:].isdigit():
            put("first", int(part[4:]), part)
        elif part.startswith("seed") and part[4:].isdigit():
            put("seed", int(part[4:]), part)
        elif part and all(t in FAMILIES for t in part.split("+")):
            put("tasks", tuple(part.split("+")), part)
        else:
            raise UsageError(f"synth spec {spec!r}: cannot read {part!r} (expected {SPEC_HELP}; "
                             f"tasks: {', '.join(TASKS)})")
    return SynthSpec(**found)
