"""Drift as the paper describes it: public-style demonstrations whose errors are systematic.

Random label noise does not make a model drift (greedy decoding averages it away; the feasibility study
measured a noisy mix scoring *higher*). Public demonstrations go wrong the same way again and again, so a
model trained on them learns the error. This demonstrator has three habits, each applied to a demo with its
own rate and always in the same direction:

  - colour confusion: it sees one colour as another (green as blue, by default), everywhere in the image;
  - a dropped object: it misses the last object in reading order (the bottom-right one; a chart's last bar);
  - an off-by-one step: its final number is one more than its own steps add up to.

A mis-perception propagates: the think is worked from what the demonstrator saw (when the question still
has an answer on that scene; otherwise from the true scene), so the answer can be wrong too. The clean and
drifted arms are built from the same problems (`arms`), so they are matched in distinct scenes and differ
only in the demonstrations. Teacher.usage records what was applied to each demo.

    clean, drifted = arms("train", 2000, seed=0, drift=DEFAULT_DRIFT)
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample, Teacher

from .benchmark import generate
from .oracle import caption_for, oracle_demo, synth_fields, with_bars, with_objects
from .scene import COLORS, reading_order
from .tasks import FAMILIES, Reasoning


@dataclass(frozen=True)
class Drift:
    confusion_rate: float = 0.5     # share of demos (whose scene has `confuse_from`) that see it as `confuse_to`
    drop_rate: float = 0.25         # share of demos (scenes with 2+ objects or bars) missing the last one
    off_by_one_rate: float = 0.25   # share of numeric demos whose final number is one too many
    confuse_from: str = "green"
    confuse_to: str = "blue"
    # both ways: it also sees `confuse_to` as `confuse_from`, so its captions keep the teacher's colour words
    # and line counts and only the image shows the error (docs/miniature.md, "drift only in the image")
    both_ways: bool = False

    def check(self) -> None:
        for name in ("confusion_rate", "drop_rate", "off_by_one_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"drift {name} must be between 0 and 1, not {value}")
        for name in ("confuse_from", "confuse_to"):
            if getattr(self, name) not in COLORS:
                raise UsageError(f"drift {name} must be one of {', '.join(COLORS)}, not {getattr(self, name)!r}")
        if self.confuse_from == self.confuse_to:
            raise UsageError("drift confuse_from and confuse_to must differ")


DEFAULT_DRIFT = Drift()
# `:drift-swap`: green and blue swapped both ways in half the demos that show either; no other habit
IMAGE_ONLY_DRIFT = Drift(confusion_rate=0.5, drop_rate=0.0, off_by_one_rate=0.0, both_ways=True)
DRIFTS = {"drift": DEFAULT_DRIFT, "drift-swap": IMAGE_ONLY_DRIFT}


# ---- the habits, as pure functions of a scene ---------------------------------------------------------------

def has_color(scene: dict, color: str) -> bool:
    things = scene["bars"] if scene["kind"] == "chart" else scene["objects"]
    return any(t["color"] == color for t in things)


def confused(scene: dict, source: str, target: str, both_ways: bool = False) -> dict:
    """The scene as seen by someone who takes `source` for `target` (and, both ways, `target` for `source`)."""
    swap = {source: target, **({target: source} if both_ways else {})}

    def recolour(thing):
        return {**thing, "color": swap[thing["color"]]} if thing["color"] in swap else thing
    if scene["kind"] == "chart":
        return with_bars(scene, [recolour(b) for b in scene["bars"]])
    return with_objects(scene, [recolour(o) for o in scene["objects"]])


def can_drop(scene: dict) -> bool:
    return len(scene["bars"] if scene["kind"] == "chart" else scene["objects"]) > 1


def dropped_last(scene: dict) -> dict:
    """The scene without its last object in reading order (a chart: without its rightmost bar)."""
    if scene["kind"] == "chart":
        return with_bars(scene, scene["bars"][:-1])
    last = reading_order(scene["objects"])[-1]
    return with_objects(scene, [o for o in scene["objects"] if o is not last])


def one_too_many(reasoning: Reasoning) -> Reasoning:
    return Reasoning(reasoning.steps, reasoning.joiner, str(int(reasoning.answer) + 1))


# ---- the demonstrator -------------------------------------------------------------------------------------------

def drifted_demo(sample: Sample, drift: Drift = DEFAULT_DRIFT, seed: int = 0) -> Teacher:
    """The drifted demonstrator's caption / think / answer for a synth sample; deterministic per (seed, id)."""
    drift.check()
    scene, query, _level = synth_fields(sample)
    family = FAMILIES[sample.task]
    truth = family.solve(scene, query)
    if truth is None:
        raise PrismError(f"sample {sample.id}: its question has no answer on its own scene (corrupt meta?)")
    rng = random.Random(f"drift/{seed}/{sample.id}")
    # Three draws every time, so one rate's setting never shifts another habit's draws.
    draw_confusion, draw_drop, draw_step = rng.random(), rng.random(), rng.random()
    perceived, applied = scene, []
    shows = has_color(scene, drift.confuse_from) or (drift.both_ways and has_color(scene, drift.confuse_to))
    if draw_confusion < drift.confusion_rate and shows:
        perceived = confused(perceived, drift.confuse_from, drift.confuse_to, drift.both_ways)
        applied.append("confusion")
    if draw_drop < drift.drop_rate and can_drop(perceived):
        perceived = dropped_last(perceived)
        applied.append("drop")
    reasoning = family.solve(perceived, query) if perceived is not scene else truth
    reasoned_from = "perceived"
    if reasoning is None:  # the question names something the demonstrator did not see: it reads the question
        reasoning, reasoned_from = truth, "truth"
    if draw_step < drift.off_by_one_rate and family.numeric:
        reasoning = one_too_many(reasoning)
        applied.append("off_by_one")
    usage = {"drift": applied, "reasoned_from": reasoned_from, "answer_correct": reasoning.answer == sample.answer}
    return Teacher(caption=caption_for(perceived, sample.task), think=reasoning.think, answer=reasoning.answer,
                   model="oracle-drift", usage=usage)


def arms(split: str, n: int, seed: int = 0, drift: Drift = DEFAULT_DRIFT, **generate_kw
         ) -> tuple[list[Sample], list[Sample]]:
    """(clean, drifted): the same n problems (same ids, images, scenes), with the clean oracle's demos in
    one and the drifted demonstrator's in the other. Matched in distinct scenes by construction."""
    drift.check()
    problems = generate(split, n, seed=seed, **generate_kw)
    clean = [dataclasses.replace(s, teacher=oracle_demo(s)) for s in problems]
    drifted = [dataclasses.replace(s, teacher=drifted_demo(s, drift, seed)) for s in problems]
    return clean, drifted
