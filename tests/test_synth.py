"""synth: determinism, split hygiene, correct answers, oracle demos, noise rates, caption accuracy, specs."""

import dataclasses
import io
import json
import random
import re
from collections import Counter

import pytest
from PIL import Image

from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample
from stages.common.world.synth import (
    TASKS,
    caption_accuracy,
    caption_for,
    generate,
    load,
    oracle_demo,
    parse_spec,
    render,
    scene_hash,
    split_of,
)
from stages.common.world.synth.scene import COLORS, SIDES
from stages.common.world.synth.tasks import FAMILIES


def response_text(t) -> str:
    # The canonical protocol text (stages/common/protocol.py defines it; spelled out here on purpose).
    return f"<caption>\n{t.caption}\n</caption>\n<think>\n{t.think}\n</think>\n<answer>{t.answer}</answer>"


def as_json(samples):
    return json.dumps([dataclasses.asdict(s) | {"images": [b.hex() for b in s.images]} for s in samples],
                      sort_keys=True)


def shapes_sample(task, objects, query, answer="", choices=None, difficulty=3):
    scene = {"kind": "shapes", "objects": objects}
    return Sample(id=f"hand-{task}", images=[], question="", answer=answer, choices=choices, task=task,
                  source="synth", meta={"difficulty": difficulty, "scene": scene, "split": "train", "query": query})


def obj(color, shape, size="large", x=0.5, y=0.5):
    return {"color": color, "shape": shape, "size": size, "x": x, "y": y}


# ---- determinism and splits -----------------------------------------------------------------------

def test_same_seed_same_bytes_and_prefix_stable():
    a = generate("train", 25, seed=7)
    b = generate("train", 25, seed=7)
    assert as_json(a) == as_json(b)
    assert as_json(generate("train", 10, seed=7)) == as_json(a[:10])  # sample i does not depend on n


def test_different_seeds_differ():
    a, b = generate("train", 10, seed=0), generate("train", 10, seed=1)
    assert all(x.images[0] != y.images[0] for x, y in zip(a, b))


def test_train_and_test_never_share_a_scene():
    train, test = generate("train", 400, seed=0), generate("test", 400, seed=0)
    train_hashes = {scene_hash(s.meta["scene"]) for s in train}
    test_hashes = {scene_hash(s.meta["scene"]) for s in test}
    assert not train_hashes & test_hashes
    assert {split_of(s.meta["scene"]) for s in train} == {"train"}
    assert {split_of(s.meta["scene"]) for s in test} == {"test"}
    # and no image either, whatever the seed of the other split
    assert not {s.images[0] for s in train} & {s.images[0] for s in generate("test", 200, seed=5)}


def test_sample_fields():
    samples = generate("test", 30, seed=0)
    assert [s.id for s in samples] == [f"synth-test-{i:06d}" for i in range(30)]
    assert {s.task for s in samples} == set(TASKS)
    assert {s.meta["difficulty"] for s in samples} == {1, 2, 3}
    for s in samples:
        assert s.source == "synth" and s.meta["split"] == "test"
        json.dumps(s.meta)  # JSON-able
        img = s.pil_images()[0]
        assert img.size == (64, 64)
        if s.task == "larger_shape":
            assert s.answer in "AB" and len(s.choices) == 2
            assert s.question.endswith(f"\nA. {s.choices[0]}\nB. {s.choices[1]}")
        else:
            assert s.answer.isdigit() and s.choices is None


def test_filters_and_image_size():
    samples = generate("train", 6, tasks=["chart_diff"], difficulty=2, image_size=128)
    assert {s.task for s in samples} == {"chart_diff"} and {s.meta["difficulty"] for s in samples} == {2}
    assert Image.open(io.BytesIO(samples[0].images[0])).size == (128, 128)
    small = generate("train", 6, tasks=["chart_diff"], difficulty=2)
    assert [s.meta["scene"] for s in small] == [s.meta["scene"] for s in samples]  # same scenes, any size


def test_difficulty_grows_the_scenes():
    def mean_objects(level):
        samples = generate("train", 40, tasks=["count_color"], difficulty=level)
        return sum(len(s.meta["scene"]["objects"]) for s in samples) / len(samples)
    assert mean_objects(1) < mean_objects(2) < mean_objects(3)


# ---- answers are right ----------------------------------------------------------------------------

def test_hand_checked_answers():
    # reading order: top row red circle, small blue square, small red triangle; bottom row red circle, green hexagon
    scene = {"kind": "shapes", "objects": [
        obj("red", "circle", x=0.2, y=0.2), obj("blue", "square", "small", 0.5, 0.2),
        obj("red", "triangle", "small", 0.8, 0.2), obj("red", "circle", x=0.2, y=0.8),
        obj("green", "hexagon", x=0.8, y=0.8)]}

    def counting(scene):  # the red things, the circles, the sides
        return [(r.think, r.answer) for r in (
            FAMILIES["count_color"].solve(scene, {"color": "red"}),
            FAMILIES["count_shape"].solve(scene, {"shape": "circle"}), FAMILIES["sides_total"].solve(scene, {}))]

    assert counting(scene) == [("red: 2 circles large + 1 triangle small = 3", "3"), ("circles: 2 red large = 2", "2"),
                               ("sides: 0 + 0 + 4 + 3 + 6 = 13", "13")]
    options = {"options": [{"color": "blue", "shape": "square"}, {"color": "green", "shape": "hexagon"}]}
    larger = FAMILIES["larger_shape"].solve(scene, options)
    assert (larger.think, larger.answer) == ("blue square small, green hexagon large, so B", "B")
    # a named shape that is not unique has no answer
    assert FAMILIES["larger_shape"].solve(scene, {"options": [{"color": "red", "shape": "circle"},
                                                              {"color": "blue", "shape": "square"}]}) is None
    # counting steps take one term per caption line: red circles of two sizes are two lines, two terms
    two_sizes = {**scene, "objects": scene["objects"][:3] + [obj("red", "circle", "small", 0.2, 0.8)]
                 + scene["objects"][4:]}
    assert caption_for(two_sizes, "count_color") == ("- red circle large\n- blue square small\n- red triangle small"
                                                     "\n- red circle small\n- green hexagon large")
    assert counting(two_sizes) == [("red: 1 circle large + 1 triangle small + 1 circle small = 3", "3"),
                                   ("circles: 1 red large + 1 red small = 2", "2"),
                                   ("sides: 0 + 4 + 3 + 0 + 6 = 13", "13")]
    chart = {"kind": "chart", "max_value": 8, "bars": [{"color": "red", "value": 7}, {"color": "blue", "value": 3},
                                                       {"color": "green", "value": 1}]}
    pair = FAMILIES["chart_diff"].solve(chart, {"pair": ["red", "blue"]})
    assert (pair.think, pair.answer) == ("red 7 - blue 3 = 4", "4")
    extremes = FAMILIES["chart_diff"].solve(chart, {"extremes": True})
    assert (extremes.think, extremes.answer) == ("largest red 7 - smallest green 1 = 6", "6")


def independent_answer(s: Sample) -> str:
    """The answer recomputed from the scene without the family code."""
    scene, query = s.meta["scene"], s.meta["query"]
    if s.task == "count_color":
        return str(sum(o["color"] == query["color"] for o in scene["objects"]))
    if s.task == "count_shape":
        return str(sum(o["shape"] == query["shape"] for o in scene["objects"]))
    if s.task == "sides_total":
        return str(sum({"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[o["shape"]]
                       for o in scene["objects"]))
    if s.task == "larger_shape":
        sizes = [next(o["size"] for o in scene["objects"] if f"{o['color']} {o['shape']}" == c) for c in s.choices]
        return "AB"[sizes.index("large")]
    values = {b["color"]: b["value"] for b in scene["bars"]}
    if query.get("extremes"):
        return str(max(values.values()) - min(values.values()))
    return str(values[query["pair"][0]] - values[query["pair"][1]])


def test_generated_answers_match_an_independent_solver():
    for s in generate("train", 150, seed=3) + generate("test", 60, seed=3):
        assert s.answer == independent_answer(s), s.id


CAPTION_LINE = re.compile(r"- (?:(?P<n>\d+) )?(?P<color>\w+) (?P<shape>\w+) (?P<size>small|large)")


def counting_think_from_caption(s: Sample, caption: str) -> str:
    """The think a counting family should write, read off the caption's text alone: one term per line."""
    lines = []
    for line in caption.splitlines():
        m = CAPTION_LINE.fullmatch(line)
        n = int(m["n"] or 1)
        lines.append((n, m["color"], m["shape"][:-1] if n > 1 else m["shape"], m["size"]))
    if s.task == "count_color":
        color = re.fullmatch(r"How many (\w+) objects are there\?", s.question)[1]
        mine = [(n, shape, size) for n, c, shape, size in lines if c == color]
        terms = [f"{n} {shape}{'s' if n > 1 else ''} {size}" for n, shape, size in mine]
        head = color
    elif s.task == "count_shape":
        plural = re.fullmatch(r"How many (\w+) are there\?", s.question)[1]
        mine = [(n, c, size) for n, c, shape, size in lines if shape + "s" == plural]
        terms, head = [f"{n} {c} {size}" for n, c, size in mine], plural
    else:
        sides = [SIDES[shape] for n, _, shape, _ in lines for _ in range(n)]
        return f"sides: {' + '.join(map(str, sides))} = {sum(sides)}"
    return f"{head}: {' + '.join(terms)} = {sum(t[0] for t in mine)}"


def test_counting_thinks_take_one_term_per_caption_line():
    """Over generated problems: each counting think is its caption's lines, one term each in the caption's
    order, and its terms add up to the problem's answer (docs/seeing-base.md: grouped terms were miscounted)."""
    seen = Counter()
    for s in generate("train", 300, seed=5) + generate("test", 100, seed=5):
        if s.task not in ("count_color", "count_shape", "sides_total"):
            continue
        demo = oracle_demo(s)
        assert demo.think == counting_think_from_caption(s, demo.caption), (s.id, demo.caption, demo.think)
        assert demo.think.endswith(f" = {s.answer}") and demo.answer == s.answer, s.id
        seen[s.task] += 1
    assert min(seen.values()) >= 60, seen


def test_rendered_pixels_show_the_scene():
    for s in generate("train", 40, seed=1):
        img, scene = s.pil_images()[0], s.meta["scene"]
        if scene["kind"] == "shapes":
            for o in scene["objects"]:  # every object's centre has its colour
                assert img.getpixel((int(o["x"] * 64), int(o["y"] * 64))) == COLORS[o["color"]], s.id
        else:
            seen = [c for c in COLORS.values() if any(img.getpixel((x, 58)) == c for x in range(64))]
            assert len(seen) == len(scene["bars"]), s.id
    assert render({"kind": "shapes", "objects": []}, 32).size == (32, 32)


# ---- the oracle teacher -----------------------------------------------------------------------------

def test_clean_oracle_demos_parse_and_score_full():
    from stages.common.protocol import parse_response
    from stages.common.rewards import compute_score

    for s in generate("train", 60, seed=2):
        t = oracle_demo(s)
        assert t.model == "oracle" and t.answer == s.answer
        text = response_text(t)
        parsed = parse_response(text)
        assert parsed.format_ok, text
        assert parsed.answer.strip() == s.answer
        score = compute_score(text, s.answer, choices=s.choices)
        assert score["score"] == pytest.approx(1.0), (s.id, text, score)


def test_clean_oracle_demo_shape():
    s = generate("train", 1, tasks=["count_color"], difficulty=1, seed=4)[0]
    t = oracle_demo(s)
    assert all(line.startswith("- ") for line in t.caption.splitlines())
    assert t.think.endswith(f"= {s.answer}")
    assert t.usage == {"caption_error": None, "reasoning_slip": None, "answer_correct": True}
    assert oracle_demo(s) == t


def test_clean_caption_names_every_object_with_its_size_after_it():
    """Sizes in every family's caption, after the colour and shape (docs/seeing-base.md: a caption that names
    size on every problem learns to read it); same-looking objects of one size are grouped in reading order."""
    from stages.common.world.synth import caption_for

    objects = [obj("red", "square", "large", 0.15, 0.15), obj("red", "square", "large", 0.5, 0.15),
               obj("blue", "circle", "small", 0.85, 0.15), obj("red", "square", "small", 0.15, 0.85)]
    for task in ("count_color", "larger_shape"):
        assert caption_for({"kind": "shapes", "objects": objects}, task) == \
            "- 2 red squares large\n- blue circle small\n- red square small"
    chart = {"kind": "chart", "max_value": 8, "bars": [{"color": "blue", "value": 7}, {"color": "red", "value": 2}]}
    assert caption_for(chart, "chart_diff") == "- blue bar: 7\n- red bar: 2"


def test_noisy_rates_are_honoured():
    samples = generate("train", 600, seed=0)
    rng = random.Random(0)
    demos = [oracle_demo(s, caption_error_rate=0.25, reasoning_slip_rate=0.15, rng=rng) for s in samples]
    caption_errors = sum(t.usage["caption_error"] is not None for t in demos) / len(demos)
    slips = sum(t.usage["reasoning_slip"] is not None for t in demos) / len(demos)
    assert abs(caption_errors - 0.25) < 0.06 and abs(slips - 0.15) < 0.05
    assert {t.model for t in demos} == {"oracle-noisy"}
    kinds = Counter(t.usage["caption_error"] for t in demos) + Counter(t.usage["reasoning_slip"] for t in demos)
    assert {"drop", "add", "recolour", "arithmetic", "wrong_step"} <= set(kinds)
    for s, t in zip(samples, demos):
        clean = oracle_demo(s)
        # a caption error always changes the caption; a slip always changes the answer
        assert (t.caption != clean.caption) == (t.usage["caption_error"] is not None), s.id
        assert (t.answer != s.answer) == (t.usage["reasoning_slip"] is not None) == (not t.usage["answer_correct"])
    again = [oracle_demo(s, caption_error_rate=0.25, reasoning_slip_rate=0.15, rng=random.Random(0))
             for s in samples[:1]]
    assert again[0] == demos[0]


def test_oracle_refuses_non_synth_sample_and_bad_rates():
    with pytest.raises(PrismError, match="row-7"):
        oracle_demo(Sample(id="row-7", images=[], question="q", task="vqa"))
    with pytest.raises(UsageError, match="caption_error_rate"):
        oracle_demo(generate("train", 1)[0], caption_error_rate=1.5)


def test_demonstrations_are_compact(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    longest = {}
    for level in (1, 2, 3):
        samples = generate("train", 100, difficulty=level, seed=9) + generate("test", 50, difficulty=level, seed=9)
        longest[level] = max(len(tok(response_text(oracle_demo(s)))["input_ids"]) for s in samples)
    assert longest[1] <= 56 and longest[2] <= 70 and longest[3] <= 90, longest


# ---- caption accuracy -------------------------------------------------------------------------------

def test_caption_accuracy_clean_is_perfect_and_errors_lower_it():
    for s in generate("train", 50, seed=6):
        assert caption_accuracy(oracle_demo(s).caption, s)["f1"] == 1.0, s.id
    rng = random.Random(1)
    for s in generate("train", 50, seed=6):
        t = oracle_demo(s, caption_error_rate=1.0, rng=rng)
        assert caption_accuracy(t.caption, s)["f1"] < 1.0, (s.id, t.usage)


def test_caption_accuracy_parses_free_text():
    s = shapes_sample("count_color", [obj("red", "circle"), obj("red", "circle"), obj("blue", "square")],
                      {"color": "red"})
    assert caption_accuracy("- 2 red circles\n- blue square", s)["f1"] == 1.0
    assert caption_accuracy("two red circles and a blue square", s)["f1"] == 1.0
    assert caption_accuracy("- red circles\n- large blue square", s)["f1"] == 1.0
    over = caption_accuracy("- 3 red circles\n- blue square", s)
    assert (over["precision"], over["recall"]) == (0.75, 1.0)
    wrong = caption_accuracy("- red circle\n- orange square", s)
    assert (wrong["matched"], wrong["named"], wrong["actual"]) == (1, 2, 3)
    assert caption_accuracy("", s)["f1"] == 0.0
    chart = Sample(id="c", images=[], question="", meta={"scene": {"kind": "chart", "max_value": 8, "bars": [
        {"color": "red", "value": 7}, {"color": "blue", "value": 3}]}})
    assert caption_accuracy("- red bar: 7\n- blue bar: 3", chart)["f1"] == 1.0
    assert caption_accuracy("- red bar: 6\n- blue bar: 3", chart)["recall"] == 0.5


# ---- the data-source spec ---------------------------------------------------------------------------

def test_parse_spec_forms():
    assert (parse_spec("synth").split, parse_spec("synth").n, parse_spec("synth").difficulty) == ("train", 512, None)
    assert parse_spec("synth:test").split == "test"
    assert parse_spec("synth:train:2000").n == 2000
    spec = parse_spec("synth:test:200:d2")
    assert (spec.split, spec.n, spec.difficulty) == ("test", 200, 2)
    assert parse_spec("synth:test:count_color+chart_diff").tasks == ("count_color", "chart_diff")
    samples = load("synth:test:12:d3", seed=1)
    assert len(samples) == 12 and {s.meta["difficulty"] for s in samples} == {3}
    assert as_json(samples) == as_json(generate("test", 12, seed=1, difficulty=3))


def test_spec_slice_from_k_is_the_tail_of_a_longer_load():
    """synth:test:N:fromK holds problems K..K+N-1, byte for byte what a load of K+N problems holds there: the
    miniature's untouched test slice (docs/miniature.md) is problems 1,500 and up."""
    assert parse_spec("synth:test:2000:from1500").first == 1500 and parse_spec("synth:test").first == 0
    tail = load("synth:test:6:from9")
    assert [s.id for s in tail] == [f"synth-test-{i:06d}" for i in range(9, 15)]
    assert as_json(tail) == as_json(load("synth:test:15")[9:])
    assert as_json(load("synth:test:4:from2:drift", seed=3)) == as_json(load("synth:test:6:drift", seed=3)[2:])


def test_spec_seed_pins_the_problems_whatever_the_runs_seed():
    assert parse_spec("synth:train:20:seed3").seed == 3 and parse_spec("synth:train:20").seed is None
    pinned = load("synth:train:8:drift:seed3", seed=0)
    assert as_json(pinned) == as_json(load("synth:train:8:drift", seed=3))
    assert as_json(pinned) == as_json(load("synth:train:8:drift:seed3", seed=7))
    assert as_json(load("synth:train:8:seed0", seed=5)) == as_json(load("synth:train:8"))


@pytest.mark.parametrize("spec", ["synthetic", "synth:val", "synth:train:test", "synth:d4", "synth:0",
                                  "synth:train:12:d2:d3", "synth:count_colour", "synth::", "coco:train",
                                  "synth:test:from", "synth:test:from-1", "synth:train:seed", "synth:train:seed1:seed2",
                                  "synth:test:from1:from2"])
def test_bad_specs_raise_usage_error(spec):
    with pytest.raises(UsageError) as e:
        parse_spec(spec)
    assert "\n" not in e.value.message


def test_bad_generate_args_raise_usage_error():
    for kwargs in ({"split": "val", "n": 1}, {"split": "train", "n": 1, "difficulty": 4},
                   {"split": "train", "n": 1, "first": -1},
                   {"split": "train", "n": 1, "tasks": ["nope"]}, {"split": "train", "n": -1}):
        with pytest.raises(UsageError):
            generate(**kwargs)


def test_tasks_cover_the_advertised_families():
    assert set(TASKS) >= {"count_color", "sides_total", "larger_shape", "chart_diff"}
    assert SIDES["circle"] == 0


def test_samples_survive_the_parquet_row_form():
    from stages.common.contract.samples import row_to_sample, sample_to_row

    for s in generate("train", 10, seed=8):
        s.teacher = oracle_demo(s, caption_error_rate=0.5, reasoning_slip_rate=0.5)
        assert row_to_sample(sample_to_row(s)) == s
