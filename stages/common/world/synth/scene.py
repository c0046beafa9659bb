"""Scene graphs (JSON-able dicts) and their deterministic drawing.

Two scene kinds:
  {"kind": "shapes", "objects": [{"shape", "color", "size": "small"|"large", "x", "y"}, ...]}
  {"kind": "chart", "max_value": 8, "bars": [{"color", "value"}, ...]}
Positions are fractions of the canvas, so one scene renders at any image size and its hash (which
decides the split) does not depend on the size. Drawing uses PIL's aliased primitives only, so the
same scene gives the same pixels on every machine, and PNG bytes are written with fixed parameters.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random

COLORS = {
    "red": (230, 25, 25),
    "green": (20, 160, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 200, 0),
    "purple": (150, 50, 200),
}
SIDES = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
SIZES = ("small", "large")

# Difficulty widens the vocabulary as well as the object count: level 1 uses only the most
# distinct colours and shapes so a 16-token image encoding can still tell them apart.
COLORS_BY_LEVEL = {1: ("red", "green", "blue"), 2: ("red", "green", "blue", "yellow"), 3: tuple(COLORS)}
SHAPES_BY_LEVEL = {1: ("circle", "triangle", "square"), 2: ("circle", "triangle", "square", "pentagon"),
                   3: tuple(SIDES)}
OBJECTS_BY_LEVEL = {1: (2, 3), 2: (3, 5), 3: (5, 7)}
BARS_BY_LEVEL = {1: (2, 3), 2: (3, 4), 3: (4, 5)}

GRID = 3  # objects sit in distinct cells of a GRID x GRID layout: they never overlap
RADIUS_IN_CELL = {"small": 0.3, "large": 0.46}  # circumradius as a fraction of the cell side
CHART_MAX_VALUE = 8
BACKGROUND = (255, 255, 255)
GRIDLINE = (215, 215, 215)
AXIS = (0, 0, 0)

TEST_BUCKETS = 8  # one scene-hash bucket in TEST_BUCKETS belongs to the test split


# ---- building scenes ------------------------------------------------------------------------------

def random_object(rng: random.Random, colors, shapes, cell: int) -> dict:
    """One object in grid cell `cell`, jittered inside it without leaving it."""
    size = rng.choice(SIZES)
    margin = max(0.0, 0.5 - RADIUS_IN_CELL[size] - 0.04)  # free room around the shape, in cell units
    row, col = divmod(cell, GRID)
    x = (col + 0.5 + rng.uniform(-margin, margin)) / GRID
    y = (row + 0.5 + rng.uniform(-margin, margin)) / GRID
    return {"shape": rng.choice(shapes), "color": rng.choice(colors), "size": size, "x": round(x, 3), "y": round(y, 3)}


def random_shapes_scene(rng: random.Random, level: int) -> dict:
    low, high = OBJECTS_BY_LEVEL[level]
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(low, high)))
    objects = [random_object(rng, COLORS_BY_LEVEL[level], SHAPES_BY_LEVEL[level], c) for c in cells]
    return {"kind": "shapes", "objects": objects}


def random_chart_scene(rng: random.Random, level: int) -> dict:
    low, high = BARS_BY_LEVEL[level]
    colors = rng.sample(COLORS_BY_LEVEL[level], rng.randint(low, high))
    bars = [{"color": c, "value": rng.randint(1, CHART_MAX_VALUE)} for c in colors]
    return {"kind": "chart", "max_value": CHART_MAX_VALUE, "bars": bars}


def reading_order(objects: list[dict]) -> list[dict]:
    """Objects top-to-bottom, left-to-right by grid cell: the order captions list them in."""
    return sorted(objects, key=lambda o: (int(o["y"] * GRID), int(o["x"] * GRID), o["x"]))


# ---- identity and splits --------------------------------------------------------------------------

def scene_hash(scene: dict) -> str:
    return hashlib.sha256(json.dumps(scene, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def split_of(scene: dict) -> str:
    """The split a scene belongs to, fixed by its hash: train and test can never share a scene."""
    return "test" if int(scene_hash(scene)[:8], 16) % TEST_BUCKETS == 0 else "train"


# ---- drawing --------------------------------------------------------------------------------------

def polygon_points(cx: float, cy: float, r: float, sides: int) -> list[tuple[float, float]]:
    # Squares and hexagons sit flat, triangles and pentagons point up: at 10 pixels across, a flat
    # top is what tells a hexagon from a pentagon.
    start = {4: -math.pi / 4, 6: 0.0}.get(sides, -math.pi / 2)
    return [(cx + r * math.cos(start + 2 * math.pi * k / sides), cy + r * math.sin(start + 2 * math.pi * k / sides))
            for k in range(sides)]


def draw_shapes(draw, scene: dict, size: int) -> None:
    cell = size / GRID
    for o in scene["objects"]:
        cx, cy, r = o["x"] * size, o["y"] * size, RADIUS_IN_CELL[o["size"]] * cell
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=fill)
        else:
            pts = [(round(px), round(py)) for px, py in polygon_points(cx, cy, r, SIDES[o["shape"]])]
            draw.polygon(pts, fill=fill)


def draw_chart(draw, scene: dict, size: int) -> None:
    scale = size / 64
    left, bottom, top, right = round(5 * scale), size - round(4 * scale), round(4 * scale), size - round(3 * scale)
    unit = (bottom - top) / scene["max_value"]
    # One gridline per unit so a value can be read by counting lines.
    for v in range(1, scene["max_value"] + 1):
        y = round(bottom - v * unit)
        draw.line([(left, y), (right, y)], fill=GRIDLINE, width=1)
    n = len(scene["bars"])
    slot = (right - left) / n
    for i, bar in enumerate(scene["bars"]):
        x0, x1 = round(left + i * slot + slot * 0.18), round(left + (i + 1) * slot - slot * 0.18)
        draw.rectangle([x0, round(bottom - bar["value"] * unit), x1, bottom], fill=COLORS[bar["color"]])
    draw.line([(left, top), (left, bottom)], fill=AXIS, width=1)
    draw.line([(left, bottom), (right, bottom)], fill=AXIS, width=1)


def render(scene: dict, size: int = 64):
    """Draw a scene as a size x size RGB PIL image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if scene["kind"] == "shapes":
        draw_shapes(draw, scene, size)
    elif scene["kind"] == "chart":
        draw_chart(draw, scene, size)
    else:
        raise ValueError(f"unknown scene kind {scene['kind']!r}")
    return img


def png_bytes(img) -> bytes:
    # Fixed encoder settings and no metadata: identical images give identical bytes.
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
