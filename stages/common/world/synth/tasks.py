"""The task families: how each builds a problem from a random scene and how it is solved.

A family is two pure functions:
  build(rng, level) -> Problem   a scene plus the question about it (retrying until well posed)
  solve(scene, query) -> Reasoning | None   the oracle's steps and answer for *any* scene, so the
                                  noisy teacher can re-solve a mis-perceived scene; None when the
                                  question has no answer on that scene (a named object is missing)
The think text is always `steps + joiner + answer` ("red: 2 circles large + 1 square small = 3"), which
lets a reasoning slip change the final number while keeping the steps. The counting families' steps take
one term per caption line, in the caption's order, so each step points at a line instead of re-reading the
image.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .scene import SIDES, random_chart_scene, random_shapes_scene, reading_order

LETTERS = "ABCDEFGH"
MAX_TRIES = 1000  # rejection sampling bound; every family is well posed in far fewer tries


@dataclass
class Problem:
    scene: dict
    question: str
    answer: str
    query: dict  # what the question asks about, in a form solve() reads
    choices: list[str] | None = None


@dataclass
class Reasoning:
    steps: str
    joiner: str
    answer: str

    @property
    def think(self) -> str:
        return f"{self.steps}{self.joiner}{self.answer}"


@dataclass(frozen=True)
class Family:
    build: Callable[[random.Random, int], Problem]
    solve: Callable[[dict, dict], Reasoning | None]
    numeric: bool  # answers are integers (an arithmetic slip applies)


def plural(noun: str) -> str:
    return noun + "s"


def counted(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else plural(noun)}"


def groups_in_order(items) -> list[tuple]:
    """(key, count) for each distinct key, in order of first appearance."""
    counts = Counter(items)
    return [(key, counts[key]) for key in dict.fromkeys(items)]


def well_posed(build_once: Callable[[random.Random, int], Problem | None]):
    """Turn a builder that may reject its random scene into one that retries (deterministically)."""
    def build(rng: random.Random, level: int) -> Problem:
        for _ in range(MAX_TRIES):
            problem = build_once(rng, level)
            if problem is not None:
                return problem
        raise RuntimeError(f"{build_once.__name__}: no well-posed problem in {MAX_TRIES} tries")
    return build


def caption_lines(scene: dict) -> list[tuple[tuple[str, str, str], int]]:
    """((colour, shape, size), count) for each line of a shapes scene's caption, in the caption's order."""
    return groups_in_order([(o["color"], o["shape"], o["size"]) for o in reading_order(scene["objects"])])


# ---- count_color: "How many red objects are there?" ----------------------------------------------

def solve_count_color(scene: dict, query: dict) -> Reasoning:
    # One term per caption line of that colour ("- 2 red circles large" -> "2 circles large"). Grouped by
    # shape, the think had to gather lines the caption keeps apart, and skipped some: the demo_format 1 base
    # miscounted 29 of 75 count_color problems whose caption was right (docs/seeing-base.md).
    color = query["color"]
    lines = [(shape, size, n) for (c, shape, size), n in caption_lines(scene) if c == color]
    terms = " + ".join(f"{counted(n, shape)} {size}" for shape, size, n in lines) or "none"
    return Reasoning(f"{color}: {terms}", " = ", str(sum(n for _, _, n in lines)))


def build_count_color(rng: random.Random, level: int) -> Problem:
    scene = random_shapes_scene(rng, level)
    query = {"color": rng.choice(scene["objects"])["color"]}  # asked colour is always present
    return Problem(scene, f"How many {query['color']} objects are there?",
                   solve_count_color(scene, query).answer, query)


# ---- count_shape: "How many triangles are there?" ------------------------------------------------

def solve_count_shape(scene: dict, query: dict) -> Reasoning:
    shape = query["shape"]  # one term per caption line of that shape ("- 2 red circles large" -> "2 red large")
    lines = [(color, size, n) for (color, s, size), n in caption_lines(scene) if s == shape]
    terms = " + ".join(f"{n} {color} {size}" for color, size, n in lines) or "none"
    return Reasoning(f"{plural(shape)}: {terms}", " = ", str(sum(n for _, _, n in lines)))


def build_count_shape(rng: random.Random, level: int) -> Problem:
    scene = random_shapes_scene(rng, level)
    query = {"shape": rng.choice(scene["objects"])["shape"]}
    return Problem(scene, f"How many {plural(query['shape'])} are there?",
                   solve_count_shape(scene, query).answer, query)


# ---- sides_total: total number of sides, circles count 0 -----------------------------------------

SIDES_QUESTION = "What is the total number of sides of all shapes? A circle has 0 sides."


def solve_sides_total(scene: dict, query: dict) -> Reasoning:
    # Terms follow the caption's lines ("- 2 blue squares small" -> "4 + 4") so each step points at one.
    sides = [SIDES[shape] for (_, shape, _), n in caption_lines(scene) for _ in range(n)]
    return Reasoning("sides: " + " + ".join(str(s) for s in sides), " = ", str(sum(sides)))


def build_sides_total(rng: random.Random, level: int) -> Problem:
    scene = random_shapes_scene(rng, level)
    return Problem(scene, SIDES_QUESTION, solve_sides_total(scene, {}).answer, {})


# ---- larger_shape: which of two named shapes is larger (multiple choice) -------------------------

def unique_object(scene: dict, color: str, shape: str) -> dict | None:
    found = [o for o in scene["objects"] if o["color"] == color and o["shape"] == shape]
    return found[0] if len(found) == 1 else None


def solve_larger_shape(scene: dict, query: dict) -> Reasoning | None:
    named = [unique_object(scene, opt["color"], opt["shape"]) for opt in query["options"]]
    if any(o is None for o in named):
        return None
    large = [i for i, o in enumerate(named) if o["size"] == "large"]
    if len(large) != 1:  # the question needs exactly one larger option
        return None
    steps = ", ".join(f"{opt['color']} {opt['shape']} {o['size']}" for opt, o in zip(query["options"], named))
    return Reasoning(steps, ", so ", LETTERS[large[0]])


def choice_block(choices: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(choices))


@well_posed
def build_larger_shape(rng: random.Random, level: int) -> Problem | None:
    scene = random_shapes_scene(rng, level)
    nameable = [o for o in scene["objects"] if unique_object(scene, o["color"], o["shape"]) is o]
    small = [o for o in nameable if o["size"] == "small"]
    large = [o for o in nameable if o["size"] == "large"]
    if not small or not large:
        return None
    pair = [rng.choice(small), rng.choice(large)]
    rng.shuffle(pair)
    query = {"options": [{"color": o["color"], "shape": o["shape"]} for o in pair]}
    choices = [f"{o['color']} {o['shape']}" for o in pair]
    question = f"Which shape is larger?\n{choice_block(choices)}"
    return Problem(scene, question, solve_larger_shape(scene, query).answer, query, choices)


# ---- chart_diff: read a bar chart and subtract ---------------------------------------------------

def bar_values(scene: dict) -> dict[str, int]:
    return {b["color"]: b["value"] for b in scene["bars"]}


def solve_chart_diff(scene: dict, query: dict) -> Reasoning | None:
    values = bar_values(scene)
    if query.get("extremes"):
        ranked = sorted(values.values())
        if len(ranked) < 2 or ranked[-1] == ranked[-2] or ranked[0] == ranked[1]:
            return None  # largest or smallest bar is not unique
        hi = max(values, key=values.get)
        lo = min(values, key=values.get)
        steps = f"largest {hi} {values[hi]} - smallest {lo} {values[lo]}"
    else:
        hi, lo = query["pair"]
        if hi not in values or lo not in values or values[hi] < values[lo]:
            return None
        steps = f"{hi} {values[hi]} - {lo} {values[lo]}"
    return Reasoning(steps, " = ", str(values[hi] - values[lo]))


@well_posed
def build_chart_diff(rng: random.Random, level: int) -> Problem | None:
    scene = random_chart_scene(rng, level)
    if level >= 3:  # level 3 must find the extremes itself before subtracting
        query = {"extremes": True}
        question = "How much larger is the largest bar than the smallest bar?"
    else:
        a, b = rng.sample(scene["bars"], 2)
        if a["value"] == b["value"]:
            return None
        hi, lo = (a, b) if a["value"] > b["value"] else (b, a)
        query = {"pair": [hi["color"], lo["color"]]}
        question = f"How much larger is the {hi['color']} bar than the {lo['color']} bar?"
    reasoning = solve_chart_diff(scene, query)
    return Problem(scene, question, reasoning.answer, query) if reasoning else None


FAMILIES: dict[str, Family] = {
    "count_color": Family(build_count_color, solve_count_color, numeric=True),
    "count_shape": Family(build_count_shape, solve_count_shape, numeric=True),
    "sides_total": Family(build_sides_total, solve_sides_total, numeric=True),
    "larger_shape": Family(build_larger_shape, solve_larger_shape, numeric=False),
    "chart_diff": Family(build_chart_diff, solve_chart_diff, numeric=True),
}
TASKS: tuple[str, ...] = tuple(FAMILIES)
