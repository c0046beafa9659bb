"""The paper's seven benchmarks through `prism eval --task-data`, on rows in each dataset's real schema
(tests/bench_fixtures.py), fully offline.

The model is the real prism lmms-eval model (stages.eval.lmms_plugin.PrismLMM) on the tiny checkpoint; only
its rollout engine is wrapped: every prompt still goes through the tiny model's processor and one decode
step (so the images and text must be what a real model accepts), and the stand-in then replaces the
generated text with the row's scripted response, chosen by the colour of the image that arrived. lmms-eval
loads the local copies, builds the prompts and runs the scorers itself; the test checks the prompt text,
the images, and each row's score against the hand-worked value in the fixture.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

pytest.importorskip("lmms_eval")

from stages.common.contract.config import resolve  # noqa: E402
from stages.common.contract.errors import PrismError, UsageError  # noqa: E402
from stages.common.rollout import SamplingParams, make_engine  # noqa: E402
from stages.eval import run as eval_run  # noqa: E402
from stages.eval import task_data, tasks  # noqa: E402
from stages.eval.config import EvalConfig  # noqa: E402
from stages.eval.lmms_plugin import reply_text  # noqa: E402
from tests import bench_fixtures as bf  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# How each fixture is copied in: every layout --task-data reads is used at least once.
LAYOUTS = {"mathvista": "snapshot", "mathverse": "saved", "mathvision": "parquet", "wemath": "saved",
           "mmmu": "parquet", "mmmu_pro": "snapshot", "hallusionbench": "saved"}


def first_color(image) -> tuple:
    return image.convert("RGB").getpixel((0, 0))


class ScriptedEngine:
    """The real engine's processor and one decode step per prompt, then the scripted response of the row
    whose first image arrived. Records what reached the model."""

    def __init__(self, engine, replies: dict):
        self.engine, self.replies, self.seen = engine, replies, []
        self.name = engine.name

    def generate(self, prompts, params):
        real = self.engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=1, seed=0))
        for prompt, completions in zip(prompts, real):
            text = prompt.messages[-1]["content"][-1]["text"]
            colors = tuple(first_color(im) for im in prompt.images)
            self.seen.append((text, colors))
            completions[0].text = self.replies[colors[0]]
        return real

    def __getattr__(self, name):
        return getattr(self.engine, name)


def scripted(monkeypatch, fixtures) -> list:
    """Wrap every engine prism eval makes; returns the list the engines record into."""
    replies = {r.colors[0]: bf.response(r.answer) for f in fixtures for r in f.rows}
    made = []

    def make(name, model, processor, **opts):
        engine = ScriptedEngine(make_engine(name, model, processor, **opts), replies)
        made.append(engine)
        return engine

    monkeypatch.setattr(eval_run, "make_engine", make)
    return made


def write_copies(root, fixtures) -> list[str]:
    flags = []
    for f in fixtures:
        directory = root / f.alias
        bf.write_copy(f, directory, LAYOUTS[f.alias])
        if f"{f.alias}={directory}" not in flags:
            flags.append(f"{f.alias}={directory}")
    return flags


@pytest.fixture(scope="module")
def seven(tmp_path_factory, tiny_path):
    """One `prism eval` of all seven benchmarks from local copies; (results dir, what the model saw, seconds)."""
    root = tmp_path_factory.mktemp("bench")
    fixtures = bf.all_fixtures()
    flags = write_copies(root / "data", fixtures)
    monkeypatch = pytest.MonkeyPatch()
    made = scripted(monkeypatch, fixtures)
    cfg = resolve(EvalConfig, flags={"ckpt": ["tiny"], "tasks": [",".join(tasks.PAPER_TASKS)], "task_data": flags,
                                     "engine": "hf", "max_new_tokens": 8, "batch_size": 4,
                                     "out": str(root / "eval")})
    start = time.perf_counter()
    try:
        out = eval_run.run(cfg)
    finally:
        monkeypatch.undo()
    return out, made[0].seen, time.perf_counter() - start, fixtures


def samples_by_task(out, alias) -> dict:
    rows = [json.loads(line) for line in (out / "samples" / f"{alias}.jsonl").read_text().splitlines()]
    by_task: dict = {}
    for row in rows:
        by_task.setdefault(row["task"], {})[row["doc_id"]] = row
    return by_task


@pytest.mark.parametrize("index", range(7), ids=list(tasks.PAPER_TASKS))
def test_each_benchmark_scores_every_row_as_worked_out_by_hand(seven, index):
    out, seen, _, fixtures = seven
    alias = tasks.PAPER_TASKS[index]
    mine = [f for f in fixtures if f.alias == alias]
    by_task = samples_by_task(out, alias)
    prompts = {colors[0]: (text, colors) for text, colors in seen}
    expected_values = []
    for fixture in mine:
        (task,) = fixture.tasks
        rows = by_task[task]
        assert sorted(rows) == list(range(len(fixture.rows)))
        for doc_id, row in enumerate(fixture.rows):
            sample = rows[doc_id]
            assert sample["acc"] == row.acc, (task, doc_id, row.answer)
            assert sample["response"] == bf.response(row.answer)  # the full protocol response reached the scorer
            assert sample["format"] == 1.0
            text, colors = prompts[row.colors[0]]
            assert text == row.prompt, (task, doc_id)
            assert colors == row.colors, (task, doc_id)  # every image, in order
        expected_values.append(sum(r.acc for r in fixture.rows) / len(fixture.rows))
    result = json.loads((out / "results.json").read_text())["tasks"][alias]
    assert result["value"] == pytest.approx(sum(expected_values) / len(expected_values))
    assert result["n"] == sum(len(f.rows) for f in mine) and result["scorer"] == "rule"
    assert result["stderr"] > 0


def test_the_seven_benchmark_average_is_reported_with_n_and_stderr(seven):
    out, _, seconds, fixtures = seven
    report = json.loads((out / "results.json").read_text())
    paper = report["paper_average"]
    values = [report["tasks"][a]["value"] for a in tasks.PAPER_TASKS]
    assert paper["value"] == pytest.approx(sum(values) / 7) and paper["benchmarks"] == list(tasks.PAPER_TASKS)
    assert paper["n"] == sum(len(f.rows) for f in fixtures)
    stderrs = [report["tasks"][a]["stderr"] for a in tasks.PAPER_TASKS]
    assert paper["stderr"] == pytest.approx(sum(s * s for s in stderrs) ** 0.5 / 7)
    print(f"seven benchmarks end to end: {seconds:.1f} s")


def test_every_image_reached_the_tiny_model(seven):
    _, seen, _, fixtures = seven
    assert len(seen) == sum(len(f.rows) for f in fixtures)
    assert sum(len(colors) for _, colors in seen) == sum(len(r.colors) for f in fixtures for r in f.rows)


# ------------------------------------------------------------------------------- official scorers agree

def official_verdict(task: str, doc: dict, reply: str) -> float:
    """The official lmms-eval rule scorer's verdict on one reply (what the prism model sends an official task:
    the content of <answer>)."""
    if task == "wemath_testmini_reasoning":
        from lmms_eval.tasks.wemath.reasoning import utils

        return float(utils.wemath_reasoning_process_results(doc, [reply])["acc_score"])
    if task == "mmmu_val":
        from lmms_eval.tasks.mmmu import utils

        sample = utils.mmmu_process_results(doc, [reply])["mmmu_acc"]
        return float(utils.evaluate_mmmu([sample])[0][sample["id"]] == "Correct")
    if task.startswith("mmmu_pro"):
        from lmms_eval.tasks.mmmu_pro import utils

        sample = utils.mmmu_pro_process_results(doc, [reply])["mmmu_acc"]
        return float(utils.evaluate_mmmu([sample])[0].get(sample["id"]) == "Correct")
    if task == "mathvision_testmini":
        from lmms_eval.tasks.mathvision import utils

        return float(all(utils.mathvision_process_results(doc, [reply])["mathvision_standard_eval"]["scores"]))
    raise KeyError(task)


# name -> (official task, the prism model's reply mode for it). wemath_testmini_reasoning reads <answer> from
# the reply itself (lmms-eval's reasoning scorer), so it gets the full response (model_args reply=full); the
# others get what reply=auto sends a non-prism task: the content of <answer>.
OFFICIAL = {"mathvision": ("mathvision_testmini", "auto"), "wemath": ("wemath_testmini_reasoning", "full"),
            "mmmu": ("mmmu_val", "auto"), "mmmu_pro_standard": ("mmmu_pro_standard", "auto"),
            "mmmu_pro_vision": ("mmmu_pro_vision", "auto")}


def fixture_named(name):
    fixtures = {f.tasks[0].removeprefix("prism_"): f for f in bf.all_fixtures()}
    return {"mathvision": fixtures["mathvision_testmini"], "wemath": fixtures["wemath_testmini"],
            "mmmu": fixtures["mmmu_val"], "mmmu_pro_standard": fixtures["mmmu_pro_standard"],
            "mmmu_pro_vision": fixtures["mmmu_pro_vision"]}[name]


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_rule_scorers_on_the_same_responses(name):
    """Per row: prism's verdict, the official scorer's, and the official one worked out by hand. They differ
    only where the fixture says so (docs/eval-offline.md, "Rule scoring against the official scorers")."""
    if name == "mathvision":
        try:
            import lmms_eval.tasks.mathvision.eval_utils  # noqa: F401
        except ImportError as e:  # its latex2sympy2 needs antlr4 4.7.2; math-verify pins 4.13.2
            pytest.skip(f"lmms-eval's MathVision scorer does not import here: {e}")
    fixture = fixture_named(name)
    task, mode = OFFICIAL[name]
    table = []
    for doc_id, row in enumerate(fixture.rows):
        doc = bf.dataset(fixture, [row])[0]
        full = bf.response(row.answer)
        prism = tasks.SCORERS[fixture.tasks[0]](doc, full)["acc"]
        official = official_verdict(task, doc, reply_text(full, task, mode))
        table.append((doc_id, row.answer, prism, official, row.official))
    print("\n".join(f"{task} row {i}: reply {a!r}: prism {p}, official {o} (expected {e})" for i, a, p, o, e in table))
    assert [p for _, _, p, _, _ in table] == [row.acc for row in fixture.rows]
    assert [o if e is not None else None for _, _, _, o, e in table] == [row.official for row in fixture.rows]


# ---------------------------------------------------------------------------------- --task-data refusals

def plans(names="mathvista"):
    return tasks.plan_tasks(names)


def test_wrong_schema_fails_in_one_line_naming_task_columns_and_found(tmp_path):
    fixture = bf.mathvista()
    broken = (bf.dataset(fixture).rename_column("decoded_image", "picture")  # options as the text of a list:
              .map(lambda r: {"listed": str(r["choices"])}).remove_columns("choices").rename_column("listed", "choices"))
    import datasets

    datasets.DatasetDict({"testmini": broken}).save_to_disk(str(tmp_path / "mv"))
    with pytest.raises(PrismError) as info:
        task_data.resolve([f"mathvista={tmp_path / 'mv'}"], plans())
    message = info.value.message
    assert "\n" not in message and "prism_mathvista_testmini" in message and "AI4Math/MathVista" in message
    assert "no 'decoded_image'" in message and "'choices' is text, not a list" in message
    assert "Expected columns: question (text), decoded_image (image)" in message and "picture (image)" in message


def test_images_stored_as_paths_are_refused(tmp_path):
    fixture = bf.wemath()
    features = bf.Features({**fixture.features, "image_path": bf.S})
    ds = bf.datasets.Dataset.from_list([{**r.doc, "image_path": f"images/{i}.png"} for i, r in enumerate(fixture.rows)],
                                       features=features)
    bf.datasets.DatasetDict({"testmini": ds}).save_to_disk(str(tmp_path / "wm"))
    with pytest.raises(PrismError, match="'image_path' is text, not an image"):
        task_data.resolve([f"wemath={tmp_path / 'wm'}"], plans("wemath"))


def test_missing_split_and_empty_copy(tmp_path):
    fixture = bf.mathvista()
    bf.datasets.DatasetDict({"test": bf.dataset(fixture)}).save_to_disk(str(tmp_path / "wrong_split"))
    with pytest.raises(PrismError, match="reads split 'testmini'; the copy has 'test'"):
        task_data.resolve([f"mathvista={tmp_path / 'wrong_split'}"], plans())
    (tmp_path / "empty" / "data").mkdir(parents=True)
    bf.dataset(fixture).select([]).to_parquet(str(tmp_path / "empty" / "data" / "testmini-00000-of-00001.parquet"))
    with pytest.raises(PrismError, match="split 'testmini' of the copy is empty"):
        task_data.resolve([f"mathvista={tmp_path / 'empty'}"], plans())
    (tmp_path / "nothing").mkdir()
    with pytest.raises(PrismError, match="no data for prism_mathvista_testmini's split 'testmini'.*no dataset files"):
        task_data.resolve([f"mathvista={tmp_path / 'nothing'}"], plans())
    # test-*.parquet is not testmini
    bf.write_copy(bf.Fixture(**{**fixture.__dict__, "split": "test"}), tmp_path / "pq", "parquet")
    with pytest.raises(PrismError, match=r"found test-00000-of-00001.parquet \(parquet\)"):
        task_data.resolve([f"mathvista={tmp_path / 'pq'}"], plans())


def test_task_data_names_and_layouts(tmp_path):
    with pytest.raises(UsageError, match="is not NAME=DIR"):
        task_data.parse_task_data(["mathvista"])
    with pytest.raises(UsageError, match="no such task among --tasks"):
        task_data.resolve([f"mmmu={tmp_path}"], plans("mathvista"))
    with pytest.raises(UsageError, match="no such directory"):
        task_data.resolve([f"mathvista={tmp_path / 'absent'}"], plans())
    standard, vision = bf.mmmu_pro()
    for f in (standard, vision):
        bf.write_copy(f, tmp_path / "pro", "saved")
    copies = task_data.resolve([f"mmmu-pro={tmp_path / 'pro'}"], plans("mmmu_pro"))
    assert set(copies) == {"prism_mmmu_pro_standard", "prism_mmmu_pro_vision"}
    assert copies["prism_mmmu_pro_vision"].override["dataset_path"] == str(tmp_path / "pro" / "vision")
    assert copies["prism_mmmu_pro_vision"].rows == 3
    # an lmms-eval task name works as NAME too
    copies = task_data.resolve([f"prism_mmmu_pro_vision={tmp_path / 'pro'}"], plans("mmmu_pro"))
    assert set(copies) == {"prism_mmmu_pro_vision"}


def test_specs_match_the_task_yamls():
    """Where SPECS says a task reads its data is where its YAML (ours or lmms-eval's) says."""
    from pathlib import Path

    import lmms_eval

    from stages.eval.lmms_runner import PACKAGE_TASK_DIR

    # every YAML of lmms-eval that names a task of SPECS (read as text first: there are hundreds), and ours
    names = re.compile(r"^task:\s*[\"']?(" + "|".join(map(re.escape, task_data.SPECS)) + r")[\"']?\s*$", re.M)
    yamls = [*PACKAGE_TASK_DIR.glob("*.yaml")]
    yamls += [p for p in (Path(lmms_eval.__file__).parent / "tasks").rglob("*.yaml")
              if names.search(p.read_text(encoding="utf-8", errors="replace"))]
    configs = {}
    for path in yamls:
        config = task_data.task_yaml(path)
        if isinstance(config.get("task"), str):
            configs[config["task"]] = config
    for task, spec in task_data.SPECS.items():
        config = configs[task]
        assert (config["dataset_path"], config.get("dataset_name"), config["test_split"]) == \
            (spec.hub_id, spec.config, spec.split), task
    planned = {t for b in tasks.BENCHMARKS.values() for t in (*b.override_tasks, *b.official_tasks)}
    assert planned - {"mmmu_pro"} <= set(task_data.SPECS)


# --------------------------------------------------------------------------------------- the CLI, offline

def test_cli_evaluates_mathvista_from_a_local_copy_offline(tmp_path, tiny_path):
    """The issue's acceptance command, in a fresh process with the hub switched off. The tiny model answers
    for itself here (random weights): the check is that 4 rows are read, scored and reported."""
    bf.write_copy(bf.mathvista(), tmp_path / "MathVista", "snapshot")
    out = tmp_path / "OUT"
    cmd = [sys.executable, "-m", "prism_cli", "eval", "--ckpt", "tiny", "--tasks", "mathvista", "--task-data",
           f"mathvista={tmp_path / 'MathVista'}", "--limit", "4", "--out", str(out), "--engine", "hf",
           "--max-new-tokens", "4"]
    done = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["tasks"]["mathvista"]["n"] == 4 and 0.0 <= report["tasks"]["mathvista"]["value"] <= 1.0
    assert report["paper_average"] is None  # one benchmark: no average


def test_cli_refuses_a_wrong_schema_copy_in_one_line(tmp_path, tiny_path):
    fixture = bf.mathvista()
    bf.datasets.DatasetDict({"testmini": bf.dataset(fixture).remove_columns("decoded_image")}).save_to_disk(
        str(tmp_path / "mv"))
    cmd = [sys.executable, "-m", "prism_cli", "eval", "--ckpt", "tiny", "--tasks", "mathvista", "--task-data",
           f"mathvista={tmp_path / 'mv'}", "--out", str(tmp_path / "OUT")]
    done = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "no 'decoded_image'" in errors[0], done.stderr
    assert not (tmp_path / "OUT").exists()


def test_two_snapshots_in_folders_of_the_same_name_are_not_confused(tmp_path):
    """`datasets` caches a local folder by its name and README patterns: read as such, a second copy named like
    the first would come back with the first one's rows. prism names the files by absolute path instead."""
    fixture = bf.mathvista()
    bf.write_copy(fixture, tmp_path / "a" / "MathVista", "snapshot", rows=fixture.rows[:2])
    bf.write_copy(fixture, tmp_path / "b" / "MathVista", "snapshot", rows=fixture.rows[2:])
    first = task_data.resolve([f"mathvista={tmp_path / 'a' / 'MathVista'}"], plans())["prism_mathvista_testmini"]
    second = task_data.resolve([f"mathvista={tmp_path / 'b' / 'MathVista'}"], plans())["prism_mathvista_testmini"]
    assert (first.layout, first.rows, second.rows) == ("snapshot", 2, 3)
    assert second.override["dataset_kwargs"]["data_files"]["testmini"] == \
        [str(tmp_path / "b" / "MathVista" / "data" / "testmini-00000-of-00001.parquet")]


def test_under_a_judge_the_official_task_reads_the_copy_and_its_columns_are_checked(tmp_path):
    bf.write_copy(bf.mathvista(), tmp_path / "mv", "saved")
    judged = tasks.plan_tasks("mathvista", judge="http://localhost:1/v1#judge")
    copies = task_data.resolve([f"mathvista={tmp_path / 'mv'}"], judged)
    assert set(copies) == {"mathvista_testmini_cot"} and copies["mathvista_testmini_cot"].rows == 5
    bf.datasets.DatasetDict({"testmini": bf.dataset(bf.mathvista()).remove_columns("query")}).save_to_disk(
        str(tmp_path / "no_query"))
    with pytest.raises(PrismError, match="as mathvista_testmini_cot reads it: no 'query'"):
        task_data.resolve([f"mathvista={tmp_path / 'no_query'}"], judged)
    task_data.resolve([f"mathvista={tmp_path / 'no_query'}"], plans())  # the override does not read it


def test_any_other_lmms_eval_task_reads_its_split_from_its_yaml(tmp_path):
    from types import SimpleNamespace

    (tmp_path / "t.yaml").write_text("task: my_task\ndataset_path: someone/data\ntest_split: val\n")
    manager = SimpleNamespace(task_index={"my_task": {"type": "task", "yaml_path": str(tmp_path / "t.yaml")},
                                          "my_group": {"type": "group", "yaml_path": str(tmp_path / "g.yaml")}})
    bf.datasets.DatasetDict({"val": bf.datasets.Dataset.from_dict({"q": ["a", "b"]})}).save_to_disk(
        str(tmp_path / "copy"))
    copies = task_data.resolve([f"my_task={tmp_path / 'copy'}"], plans("my_task"), manager)
    assert copies["my_task"].rows == 2 and copies["my_task"].override["dataset_kwargs"] == {"load_from_disk": True}
    (tmp_path / "t.yaml").write_text("task: my_task\ndataset_path: someone/data\ntest_split: test\n")
    with pytest.raises(PrismError, match="my_task reads split 'test'; the copy has 'val'"):
        task_data.resolve([f"my_task={tmp_path / 'copy'}"], plans("my_task"), manager)
    for name in ("my_group", "no_such_task"):
        with pytest.raises(UsageError, match=f"--task-data {name}: lmms-eval has no single task of that name"):
            task_data.resolve([f"{name}={tmp_path / 'copy'}"], plans(name), manager)
