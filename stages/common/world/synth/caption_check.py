"""How well a caption names a synth scene's objects: precision / recall / F1 over object mentions.

Eval uses it to tell perception errors (a wrong caption) from reasoning errors (a right caption,
a wrong answer). A mention is "[count] [size] colour shape[s]" ("2 red circles", "a blue square",
"two large green triangles") or, for charts, "colour bar: value". Shapes are matched on
(colour, shape), bars on (colour, value); counts are multisets, so "3 red circles" against two
red circles is two hits and one false mention.
"""

from __future__ import annotations

import re
from collections import Counter

from stages.common.contract.errors import PrismError
from stages.common.contract.samples import Sample

from .scene import COLORS, SIDES

NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12}
# Colour and shape words the scenes never use still count as (wrong) mentions.
COLOR_WORDS = list(COLORS) + ["orange", "black", "white", "gray", "grey", "brown", "pink", "cyan"]
SHAPE_WORDS = list(SIDES) + ["rectangle", "star", "oval", "diamond", "bar"]

MENTION = re.compile(
    r"(?:\b(?P<count>\d+|" + "|".join(NUMBER_WORDS) + r")\s+)?"
    r"(?:(?:small|large|big|tiny|medium)\s+)?"
    r"\b(?P<color>" + "|".join(COLOR_WORDS) + r")\s+"
    r"(?P<shape>" + "|".join(SHAPE_WORDS) + r")(?P<plural>e?s)?\b"
    r"(?:\s*(?::|=|of|with value)\s*(?P<value>\d+))?",
    re.IGNORECASE)


def mentions(caption_text: str) -> Counter:
    """Multiset of the things a caption names: (colour, shape) or (colour, "bar", value)."""
    found: Counter = Counter()
    for m in MENTION.finditer(caption_text or ""):
        count = m.group("count")
        if count is None:
            n = 2 if m.group("plural") else 1  # "red circles" claims at least two
        else:
            n = int(count) if count.isdigit() else NUMBER_WORDS[count.lower()]
        color, shape = m.group("color").lower(), m.group("shape").lower()
        if shape == "bar":
            value = int(m.group("value")) if m.group("value") else None
            found[(color, "bar", value)] += n
        else:
            found[(color, shape)] += n
    return found


def scene_items(scene: dict) -> Counter:
    if scene["kind"] == "chart":
        return Counter((b["color"], "bar", b["value"]) for b in scene["bars"])
    return Counter((o["color"], o["shape"]) for o in scene["objects"])


def caption_accuracy(caption_text: str, sample: Sample) -> dict:
    """{"precision", "recall", "f1", "named", "matched", "actual"} of the caption against the scene."""
    scene = (sample.meta or {}).get("scene")
    if not isinstance(scene, dict) or "kind" not in scene:
        raise PrismError(f"sample {sample.id}: no synth scene graph in meta, cannot check its caption")
    named, actual = mentions(caption_text), scene_items(scene)
    matched = sum((named & actual).values())
    n_named, n_actual = sum(named.values()), sum(actual.values())
    precision = matched / n_named if n_named else float(n_actual == 0)
    recall = matched / n_actual if n_actual else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "named": n_named, "matched": matched, "actual": n_actual}
