"""tiny-seeing: the perception targets, the token/cell geometry, the collapse monitor, the metrics; a slow test
builds the base and checks the issue's targets on held-out synth problems."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from stages.common.models import seeing_base as sb
from stages.common.world.synth import TASKS, generate
from tests.conftest import LEARNING_SEED


def scene(*objects):
    return {"kind": "shapes", "objects": [dict(zip(("color", "shape", "size", "x", "y"), o)) for o in objects]}


def test_cell_targets_name_each_cell():
    s = scene(("red", "square", "large", 0.15, 0.15), ("purple", "hexagon", "small", 0.85, 0.85))
    t = sb.cell_targets(s)
    assert t["color"] == [1, 0, 0, 0, 0, 0, 0, 0, 5]
    assert t["shape"] == [sb.SHAPE_NAMES.index("square") + 1] + [0] * 7 + [sb.SHAPE_NAMES.index("hexagon") + 1]
    assert t["size"] == [2, 0, 0, 0, 0, 0, 0, 0, 1]
    chart = {"kind": "chart", "max_value": 8, "bars": [{"color": "blue", "value": 7}, {"color": "red", "value": 2}]}
    assert sb.chart_targets(chart) == [2, 0, 7, 0, 0]
    assert sb.cell_targets(chart)["shape"] == [0] * 9 and sb.chart_targets(s) == [0] * 5


def test_merged_token_i_sees_grid_cell_i(tiny_path):
    """The geometry the vision pretraining relies on: a 64-px synth image under the 48-px bound becomes 3x3
    merged tokens, and merge group i holds exactly the patches of scene cell i (row-major)."""
    from transformers import AutoProcessor

    from stages.common.world.synth.scene import render

    ip = AutoProcessor.from_pretrained(tiny_path).image_processor
    ip.size = {"shortest_edge": 32 * 32, "longest_edge": sb.IMAGE_PIXELS ** 2}
    for cell in (0, 5, 7):
        row, col = divmod(cell, 3)
        s = scene(("red", "square", "large", (col + 0.5) / 3, (row + 0.5) / 3))
        enc = ip(images=[render(s, 64)], return_tensors="pt")
        assert enc["image_grid_thw"].tolist() == [[1, 6, 6]]
        groups = enc["pixel_values"].view(9, 4, -1)  # 4 patches of 8x8 (x2 frames x 3 channels) per token
        ink = (groups < 0.9).any(-1).any(-1)         # normalised white is 1.0
        assert ink.tolist() == [i == cell for i in range(9)]


def test_perception_scores_on_hand_made_captions():
    sample = generate("test", 5, tasks=["count_color"])[0]
    objects = sample.meta["scene"]["objects"]
    right = "\n".join(f"- {o['color']} {o['shape']}" for o in objects)
    got = sb.perception_scores(right, sample)
    assert got == {"caption_f1": 1.0, "color_f1": 1.0, "exact_count": 1.0, "shape_f1": 1.0}
    o = objects[0]
    other = next(c for c in sb.COLOR_NAMES if c != o["color"])
    recoloured = right.replace(f"- {o['color']} {o['shape']}", f"- {other} {o['shape']}", 1)
    got = sb.perception_scores(recoloured, sample)
    assert got["shape_f1"] == 1.0 and got["exact_count"] == 1.0 and got["color_f1"] < 1.0
    assert sb.perception_scores("", sample) == {"caption_f1": 0.0, "color_f1": 0.0, "exact_count": 0.0,
                                                "shape_f1": 0.0}
    assert sb.attribute_f1(["a", "a", "b"], ["a", "b"]) == pytest.approx(0.8)


def test_norm_penalty_only_punishes_excess():
    tokens = torch.tensor([[3.0, 4.0], [0.3, 0.4]])     # norms 5 and 0.5
    assert sb.norm_penalty(tokens, 1.0).item() == pytest.approx(16 / 2)
    assert sb.norm_penalty(tokens, 10.0).item() == 0.0


@pytest.mark.learning
def test_vision_pretraining_learns_and_is_monitored(tiny_path, record_learning):
    """A few dozen steps already beat chance on held-out cells, and the monitor reports the cosines."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ip = AutoProcessor.from_pretrained(tiny_path).image_processor
    ip.size = {"shortest_edge": 32 * 32, "longest_edge": sb.IMAGE_PIXELS ** 2}
    visual = AutoModelForImageTextToText.from_pretrained(tiny_path).model.visual
    recipe = sb.SeeingRecipe(vision_steps=60, vision_batch=16, vision_images=400, vision_warmup=10,
                             seed=LEARNING_SEED)
    records = sb.pretrain_vision(visual, ip, recipe, log=lambda r: None)
    first, last = records[0], records[-1]
    record_learning("loss last / first", last["loss"] / first["loss"], 0.7, above=False)
    record_learning("colour probe", last["probe_color"], 0.6)
    record_learning("size probe", last["probe_size"], 0.6)
    # Measured (issue 37, benchmarks/results/learning-spread.md: seeds 0-3 over the AVX512, AVX2, default paths):
    # loss last/first 0.34-0.44 over 7 runs (mean 0.38, sd 0.05: the old bar, 0.5, was 2.4 sd away; 0.7 is 6 sd);
    # colour probe 0.92-0.97 and size probe 0.99-1.0 against 0.6 (19 sd and more). The probes are the claim.
    assert last["loss"] < 0.7 * first["loss"]
    assert last["probe_color"] > 0.6 and last["probe_size"] > 0.6  # chance: 1/6 and 1/3 on occupied cells
    for key in ("cos_colour", "cos_shape"):
        assert -1.0 <= last[key] <= 1.0


def test_collate_pads_without_labels():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
         "mm_token_type_ids": torch.tensor([0, 1, 0]), "pixel_values": torch.zeros(4, 2),
         "image_grid_thw": torch.tensor([[1, 2, 2]])}
    b = {"input_ids": torch.tensor([5]), "labels": torch.tensor([5]), "mm_token_type_ids": torch.tensor([0]),
         "pixel_values": torch.ones(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    batch = sb.collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["pixel_values"].shape == (8, 2)


def test_tiny_seeing_is_a_checkpoint_spec():
    from stages.common.contract.checkpoint import resolve
    from stages.common.world import tiny
    assert resolve("tiny-seeing").kind == "tiny"
    assert tiny.build_key("tiny-seeing") != tiny.build_key("tiny")


def test_build_end_to_end_on_a_micro_recipe(tmp_path, monkeypatch):
    """The whole build at toy size: both phases run, the result reloads through the Auto classes with its
    48-px processor, seeing.json records the recipe and the monitor, and a round with problem set 1 trains on
    problems of its own (a third round on set 0 reuses the first set's)."""
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.common.world import synth
    drawn = []
    real_generate = synth.generate
    monkeypatch.setattr(synth, "generate", lambda split, n, seed=0, **kw: drawn.append((split, n, seed))
                        or real_generate(split, n, seed=seed, **kw))
    recipe = sb.SeeingRecipe(vision_steps=3, vision_batch=4, vision_images=20, text_batch=2, text_problems=8,
                             text_rounds=((3, 1e-3, 1), (2, 1e-3, 1, 1), (1, 1e-3, 1, 0)), vision_warmup=1)
    out = sb.build(tmp_path / "seeing", recipe=recipe, log=lambda r: None)
    assert [d for d in drawn if d[0] == "train"] == [("train", 8, 1000), ("train", 8, 4000)]
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_processor.size["longest_edge"] == sb.IMAGE_PIXELS ** 2
    enc = processor.image_processor(images=[generate("test", 1)[0].pil_images()[0]], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert all(p.requires_grad for p in model.parameters())  # frozen only while it was built
    record = json.loads((out / "seeing.json").read_text())
    assert record["recipe"]["image_pixels"] == 48
    assert record["recipe"]["text_rounds"] == [[3, 1e-3, 1], [2, 1e-3, 1, 1], [1, 1e-3, 1, 0]]
    assert [r["phase"] for r in record["records"]][:1] == ["vision"] and record["records"][-1]["phase"] == "text"
    assert "cos_shape" in record["records"][0]
    text_records = [(r["round"], r["step"]) for r in record["records"] if r["phase"] == "text"]
    assert text_records == [(0, 0), (0, 2), (1, 0), (1, 1), (2, 0)]


def test_continuing_a_build_equals_building_the_whole_recipe(tmp_path):
    """continue_build runs only the rounds a build lacks, and the weights are exactly the whole build's (how
    a recipe that appends a round is reshipped without rebuilding the tower). It refuses a build of another
    recipe."""
    from safetensors.torch import load_file

    from stages.common.contract.errors import PrismError

    whole = sb.SeeingRecipe(vision_steps=3, vision_batch=4, vision_images=20, text_batch=2, text_problems=8,
                            text_rounds=((3, 1e-3, 1), (2, 2e-3, 1, 1), (2, 1e-3, 1, 2)), vision_warmup=1)
    first = dataclasses.replace(whole, text_rounds=whole.text_rounds[:1])
    quiet = {"log": lambda r: None}
    reference = load_file(sb.build(tmp_path / "whole", recipe=whole, **quiet) / "model.safetensors")
    sb.build(tmp_path / "first", recipe=first, **quiet)
    out = sb.continue_build(tmp_path / "first", tmp_path / "continued", recipe=whole, **quiet)
    continued = load_file(out / "model.safetensors")
    assert continued.keys() == reference.keys()
    assert all(torch.equal(continued[k], reference[k]) for k in reference)
    record = json.loads((out / "seeing.json").read_text())
    assert record["recipe"] == json.loads((tmp_path / "whole" / "seeing.json").read_text())["recipe"]
    assert [r["round"] for r in record["records"] if r["phase"] == "text"] == [0, 0, 1, 1, 2, 2]
    other = dataclasses.replace(whole, text_batch=3)
    with pytest.raises(PrismError, match="cannot be continued"):
        sb.continue_build(tmp_path / "first", tmp_path / "x", recipe=other, **quiet)
    with pytest.raises(PrismError, match="cannot be continued"):
        sb.continue_build(tmp_path / "whole", tmp_path / "y", recipe=whole, **quiet)  # nothing left to run


def test_shipped_base_is_this_recipes_build():
    """The weights in the package are the build of the recipe in the code (change the recipe, reship)."""
    import json

    assert sb.shipped_is_current(), "the recipe changed: `python -m stages.common.models.seeing_base build --ship`"
    record = json.loads((sb.SHIPPED / "seeing.json").read_text())
    vision = [r for r in record["records"] if r["phase"] == "vision"]
    assert vision[-1]["probe_color"] > 0.95 and vision[-1]["probe_shape"] > 0.95  # the tower sees every cell
    assert vision[-1]["cos_shape"] < 0.8 and vision[-1]["cos_colour"] < 0.8       # and did not collapse
    assert {f.name for f in sb.SHIPPED.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                                       "processor_config.json", "chat_template.jinja"}


# A digest of the questions and oracle demonstrations of the build's problem set 0, per recipe.demo_format.
DEMO_TEXT_DIGESTS = {2: "b0b10bb7a8b26c90"}


def test_demo_format_pins_the_oracle_text_the_rounds_train_on():
    """Questions, captions and thinks are written by synth, outside the recipe that keys the cache: a change to
    that text fails here until `demo_format` is bumped, which makes the shipped build stale (and so rebuilt).
    All of set 0 (6,000 problems, a few seconds): a change that touches a few problems in a hundred shows."""
    import hashlib

    from stages.common.world.synth import oracle_demo

    recipe = sb.RECIPE
    samples = generate("train", recipe.text_problems, seed=recipe.seed + 1000)  # the build's problem set 0
    assert {s.task for s in samples} == set(TASKS)
    digest = hashlib.sha256()
    for s in samples:
        demo = oracle_demo(s)
        digest.update(f"{s.question}\n{demo.caption}\n{demo.think}\n{demo.answer}\n".encode())
    assert DEMO_TEXT_DIGESTS.get(recipe.demo_format) == digest.hexdigest()[:16], \
        "synth's demonstration text changed: bump SeeingRecipe.demo_format, pin the new digest, rebuild the base"


def test_provide_copies_the_shipped_build_only_when_it_is_current(tmp_path, monkeypatch):
    import filecmp
    import json
    import shutil

    built = []
    monkeypatch.setattr(sb, "build", lambda out_dir, seed=0, log=None: built.append((out_dir, seed)) or out_dir)
    out = sb.provide(tmp_path / "a")
    assert not built and filecmp.cmp(out / "model.safetensors", sb.SHIPPED / "model.safetensors", shallow=False)
    sb.provide(tmp_path / "b", seed=1)                   # another seed: only the build makes it
    monkeypatch.setenv(sb.REBUILD_ENV, "1")
    sb.provide(tmp_path / "c")                           # asked to rebuild
    monkeypatch.delenv(sb.REBUILD_ENV)
    stale = tmp_path / "stale"
    shutil.copytree(sb.SHIPPED, stale)
    record = json.loads((stale / "seeing.json").read_text())
    record["recipe"]["text_batch"] += 1
    (stale / "seeing.json").write_text(json.dumps(record))
    monkeypatch.setattr(sb, "SHIPPED", stale)
    sb.provide(tmp_path / "d")                           # a stale shipped copy is never used
    assert [b[0].name for b in built] == ["b", "c", "d"] and not (tmp_path / "d").exists()


def majority_rate(samples) -> float:
    from collections import Counter

    return Counter(s.answer for s in samples).most_common(1)[0][1] / len(samples)


def assert_meets_the_targets(got: dict, test, record=None) -> None:
    """The issue's perception targets, and each family well above its majority-answer rate on its 20 problems of
    `test`, by at least 4 problems (20 problems put about ±20 points of noise on a family; on 1,000 held-out
    problems the smallest margin is count_shape's +24, docs/seeing-base.md). record: a learning test's
    record_learning, given every statistic before the first assertion."""
    if record:
        for name, bar in {"caption_f1": 0.85, "color_f1": 0.9, "shape_f1": 0.9, "exact_count": 0.95}.items():
            record(name, got[name], bar)
        for task in TASKS:
            rate = majority_rate([s for s in test if s.task == task])
            record(f"{task} accuracy over its majority rate", got["acc_by_task"][task] - rate, 0.2)
    # No training here: greedy decoding of the shipped weights gave the same figures on every seed and on the
    # AVX512 and AVX2 kernel paths (issue 37): caption F1 0.983, colour 1.0, shape 0.995, exact count 1.0, and
    # every family 0.30-0.60 over its majority rate; the default kernels pass it in CI's run too.
    assert got["caption_f1"] >= 0.85 and got["color_f1"] >= 0.9 and got["shape_f1"] >= 0.9, got
    assert got["exact_count"] >= 0.95, got
    for task in TASKS:
        rate = majority_rate([s for s in test if s.task == task])
        assert got["acc_by_task"][task] >= rate + 0.2 - 1e-9, (task, rate, got)


@pytest.mark.learning
def test_tiny_seeing_meets_the_perception_targets(record_learning):
    """The issue's perception targets on 100 held-out problems, greedy, from the shipped base (cached like any
    tiny model)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.common.models.loading import as_spec

    path = as_spec("tiny-seeing").model_path
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    test = generate("test", 100, seed=0)
    got = sb.evaluate(model, processor, test)
    print(f"\ntiny-seeing on 100 held-out problems (greedy): {got}")
    assert_meets_the_targets(got, test, record_learning)


# Not `slow` (CI runs those): the build is longer than the rest of CI together. Run it by hand.
@pytest.mark.timeout(5400)
@pytest.mark.skipif(os.environ.get("PRISM_BUILD_SEEING") != "1",
                    reason="building tiny-seeing from scratch takes ~45-60 min on one core; PRISM_BUILD_SEEING=1 "
                           "runs it (not in CI)")
def test_a_fresh_build_meets_the_perception_targets(tmp_path, capsys):
    import json

    assert sb.main(["build", "--out", str(tmp_path / "seeing"), "--eval", "100"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert_meets_the_targets(json.loads(printed[-1]), generate("test", 100, seed=0))  # what `--eval 100` ran
