"""The oracle teacher: ideal caption / think / answer written from the scene graph, optionally noisy.

Noisy mode stands in for lower-fidelity public demonstrations. Caption errors and reasoning slips
are drawn independently, so perception faults and reasoning faults can be told apart downstream:
  - a caption error describes a mis-perceived scene (an object dropped, added or recoloured; a bar
    dropped, added, recoloured or misread); the think is still worked from the true scene;
  - a reasoning slip is an arithmetic error (the final number off by one) or a wrong step (the
    steps worked from a mis-perceived scene), either of which makes the answer wrong.
Teacher.usage records what was corrupted and whether the answer is still right.
"""

from __future__ import annotations

import random

from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample, Teacher

from .scene import COLORS_BY_LEVEL, GRID, SHAPES_BY_LEVEL, SIZES, random_object
from .tasks import FAMILIES, Reasoning, caption_lines, counted

# ---- the clean caption ----------------------------------------------------------------------------

def caption_for(scene: dict, task: str) -> str:
    """Bullet points naming every object with its size after it ("- red square large", "- 2 blue circles
    small"), grouped in reading order; or every bar with its value."""
    if scene["kind"] == "chart":
        return "\n".join(f"- {b['color']} bar: {b['value']}" for b in scene["bars"])
    # Every family names sizes, not only larger_shape: a caption that reads size on every problem learns to
    # (docs/seeing-base.md: both options' sizes right 22% -> 68-73% on the seeing base). After the object, so
    # the colour-shape mention a caption is scored on stays first.
    return "\n".join(f"- {counted(n, f'{color} {shape}') if n > 1 else f'{color} {shape}'} {size}"
                     for (color, shape, size), n in caption_lines(scene))


# ---- scene perturbations (what a noisy teacher mis-perceives) -------------------------------------

def with_objects(scene: dict, objects: list[dict]) -> dict:
    return {**scene, "objects": objects}


def with_bars(scene: dict, bars: list[dict]) -> dict:
    return {**scene, "bars": bars}


def caption_corruptions(scene: dict, level: int, rng: random.Random) -> list[tuple[str, dict]]:
    """Every way to mis-perceive the scene for a caption: (kind, perceived scene)."""
    out = []
    palette = COLORS_BY_LEVEL[level]
    if scene["kind"] == "chart":
        bars = scene["bars"]
        used = {b["color"] for b in bars}
        free = [c for c in palette if c not in used]
        for i, b in enumerate(bars):
            if len(bars) > 1:
                out.append(("drop", with_bars(scene, bars[:i] + bars[i + 1:])))
            for c in free:
                out.append(("recolour", with_bars(scene, bars[:i] + [{**b, "color": c}] + bars[i + 1:])))
            for v in (b["value"] - 1, b["value"] + 1):
                if 1 <= v <= scene["max_value"]:
                    out.append(("misread", with_bars(scene, bars[:i] + [{**b, "value": v}] + bars[i + 1:])))
        for c in free:
            out.append(("add", with_bars(scene, bars + [{"color": c, "value": rng.randint(1, scene["max_value"])}])))
        return out
    objects = scene["objects"]
    taken = {int(o["y"] * GRID) * GRID + int(o["x"] * GRID) for o in objects}
    for i, o in enumerate(objects):
        if len(objects) > 1:
            out.append(("drop", with_objects(scene, objects[:i] + objects[i + 1:])))
        for c in palette:
            if c != o["color"]:
                out.append(("recolour", with_objects(scene, objects[:i] + [{**o, "color": c}] + objects[i + 1:])))
    for cell in sorted(set(range(GRID * GRID)) - taken):
        extra = random_object(rng, palette, SHAPES_BY_LEVEL[level], cell)
        out.append(("add", with_objects(scene, objects + [extra])))
    return out


def pick_corruption(options: list[tuple[str, dict]], rng: random.Random) -> tuple[str, dict]:
    # Kind first, then instance: otherwise recolouring (many colours x many objects) would dominate.
    kind = rng.choice(sorted({k for k, _ in options}))
    return rng.choice([(k, s) for k, s in options if k == kind])


def step_corruptions(scene: dict, level: int) -> list[dict]:
    """Scenes a wrong reasoning step could have worked from: one attribute of one thing changed."""
    out = []
    if scene["kind"] == "chart":
        bars = scene["bars"]
        for i, b in enumerate(bars):
            for v in (b["value"] - 1, b["value"] + 1):
                if 1 <= v <= scene["max_value"]:
                    out.append(with_bars(scene, bars[:i] + [{**b, "value": v}] + bars[i + 1:]))
        return out
    objects = scene["objects"]
    for i, o in enumerate(objects):
        changed = [{**o, "color": c} for c in COLORS_BY_LEVEL[level] if c != o["color"]]
        changed += [{**o, "shape": s} for s in SHAPES_BY_LEVEL[level] if s != o["shape"]]
        changed += [{**o, "size": s} for s in SIZES if s != o["size"]]
        out += [with_objects(scene, objects[:i] + [c] + objects[i + 1:]) for c in changed]
    for i, a in enumerate(objects):  # swapped sizes: the slip that flips a size comparison
        for j in range(i + 1, len(objects)):
            b = objects[j]
            if a["size"] != b["size"]:
                swapped = list(objects)
                swapped[i], swapped[j] = {**a, "size": b["size"]}, {**b, "size": a["size"]}
                out.append(with_objects(scene, swapped))
    return out


def wrong_step(task: str, scene: dict, query: dict, level: int, truth: Reasoning,
               rng: random.Random) -> Reasoning | None:
    """Reasoning worked from a slightly wrong scene that reaches a different answer, if any exists."""
    solve = FAMILIES[task].solve
    candidates = []
    for perceived in step_corruptions(scene, level):
        r = solve(perceived, query)
        if r is not None and r.answer != truth.answer:
            candidates.append(r)
    return rng.choice(candidates) if candidates else None


def arithmetic_slip(truth: Reasoning, rng: random.Random) -> Reasoning:
    value = int(truth.answer)
    wrong = value + 1 if value == 0 else value + rng.choice((-1, 1))
    return Reasoning(truth.steps, truth.joiner, str(wrong))


def slip(task: str, scene: dict, query: dict, level: int, truth: Reasoning,
         rng: random.Random) -> tuple[Reasoning, str]:
    kinds = ["arithmetic", "wrong_step"] if FAMILIES[task].numeric else ["wrong_step"]
    kind = rng.choice(kinds)
    if kind == "wrong_step":
        slipped = wrong_step(task, scene, query, level, truth, rng)
        if slipped is not None:
            return slipped, "wrong_step"
        if not FAMILIES[task].numeric:  # no single mistake changes this answer: pick the other letter
            other = next(letter for letter in "AB" if letter != truth.answer)
            return Reasoning(truth.steps, truth.joiner, other), "wrong_step"
    return arithmetic_slip(truth, rng), "arithmetic"


# ---- the teacher ----------------------------------------------------------------------------------

def synth_fields(sample: Sample) -> tuple[dict, dict, int]:
    meta = sample.meta or {}
    if sample.task not in FAMILIES or "scene" not in meta or "query" not in meta:
        raise PrismError(f"sample {sample.id}: the oracle teacher only answers synth samples "
                         f"(task {sample.task!r} with a scene graph in meta)")
    return meta["scene"], meta["query"], int(meta.get("difficulty", 3))


def oracle_demo(sample: Sample, *, caption_error_rate: float = 0.0, reasoning_slip_rate: float = 0.0,
                rng: random.Random | None = None) -> Teacher:
    """The oracle's demonstration for a synth sample; noisy at the given rates (deterministic per id
    when no rng is given)."""
    for name, rate in (("caption_error_rate", caption_error_rate), ("reasoning_slip_rate", reasoning_slip_rate)):
        if not 0.0 <= rate <= 1.0:
            raise UsageError(f"{name} must be between 0 and 1, not {rate}")
    scene, query, level = synth_fields(sample)
    truth = FAMILIES[sample.task].solve(scene, query)
    if truth is None:
        raise PrismError(f"sample {sample.id}: its question has no answer on its own scene (corrupt meta?)")
    noisy = caption_error_rate > 0 or reasoning_slip_rate > 0
    caption_error = reasoning_slip = None
    perceived, reasoning = scene, truth
    if noisy:
        rng = rng if rng is not None else random.Random(f"oracle/{sample.id}")
        # Both draws happen every time so one rate's setting never shifts the other's stream.
        corrupt_caption = rng.random() < caption_error_rate
        make_slip = rng.random() < reasoning_slip_rate
        if corrupt_caption:
            caption_error, perceived = pick_corruption(caption_corruptions(scene, level, rng), rng)
        if make_slip:
            reasoning, reasoning_slip = slip(sample.task, scene, query, level, truth, rng)
    usage = {"caption_error": caption_error, "reasoning_slip": reasoning_slip,
             "answer_correct": reasoning.answer == sample.answer}
    return Teacher(caption=caption_for(perceived, sample.task), think=reasoning.think, answer=reasoning.answer,
                   model="oracle-noisy" if noisy else "oracle", usage=usage)


def with_oracle_demos(samples: list[Sample]) -> list[Sample]:
    """synth problems used directly as training data get the clean oracle demonstration as their teacher;
    other samples (and synth samples that already carry one) are returned unchanged."""
    import dataclasses

    return [dataclasses.replace(s, teacher=oracle_demo(s))
            if s.source == "synth" and s.teacher is None and not s.conversation else s for s in samples]
