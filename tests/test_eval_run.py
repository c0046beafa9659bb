"""`prism eval` end to end on the tiny model (synth natively), and its refusals of bad inputs."""

import json

import pytest
from typer.testing import CliRunner

from prism_cli.app import app
from stages.common.contract import checkpoint
from stages.common.contract.config import resolve
from stages.common.contract.errors import PrismError, UsageError
from stages.eval import lmms_runner
from stages.eval.config import EvalConfig
from stages.eval.run import run


def eval_config(**flags):
    flags = {"ckpt": ["tiny"], "tasks": ["synth"], "limit": 3, "max_new_tokens": 8, "batch_size": 3,
             "engine": "hf", **flags}
    return resolve(EvalConfig, flags=flags)


@pytest.fixture(scope="module")
def synth_eval(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("eval") / "tiny"
    return run(eval_config(out=str(out)))


def test_synth_eval_writes_an_eval_checkpoint(synth_eval):
    spec = checkpoint.resolve(str(synth_eval))
    assert spec.manifest["stage"] == "eval" and spec.manifest["parents"][0]["ref"] == "tiny"
    results = json.loads((synth_eval / "results.json").read_text())
    synth = results["tasks"]["synth"]
    assert synth["n"] == 3 and synth["metric"] == "acc" and 0.0 <= synth["value"] <= 1.0 and "stderr" in synth
    assert set(synth["extra"]) >= {"caption_f1", "format", "perception_errors", "reasoning_errors"}
    rows = [json.loads(line) for line in (synth_eval / "samples" / "synth.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"id", "response", "acc", "caption_f1", "pred"} <= set(rows[0])
    assert spec.manifest["summary"]["synth"] == synth["value"]
    assert "results.png" in spec.manifest["files"]  # the eval's plot (issue 19)


def test_greedy_eval_is_deterministic(synth_eval, tmp_path):
    again = run(eval_config(out=str(tmp_path / "again")))
    first = (synth_eval / "samples" / "synth.jsonl").read_text()
    assert (again / "samples" / "synth.jsonl").read_text() == first


def test_compare_through_the_cli(synth_eval, tmp_path):
    md = tmp_path / "table.md"
    result = CliRunner().invoke(app, ["eval", "--compare", f"{synth_eval},{synth_eval}", "--markdown", str(md)])
    assert result.exit_code == 0, result.output
    assert md.read_text().splitlines()[0] == "| checkpoint | synth | avg |"


def test_refuses_to_overwrite_a_finished_eval(synth_eval):
    with pytest.raises(PrismError, match="already holds a complete 'eval' checkpoint"):
        run(eval_config(out=str(synth_eval)))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(PrismError, match="does not exist"):
        run(eval_config(ckpt=[str(tmp_path / "nope")], out=str(tmp_path / "o")))


def test_unwritable_output(tmp_path, tiny_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PrismError, match="cannot write|is a file"):
        run(eval_config(out=str(blocker / "sub")))


def test_unknown_task_is_refused_before_any_model_loads(tmp_path):
    cfg = eval_config(tasks=["synth,no_such_task_xyz"], out=str(tmp_path / "o"))
    expected = UsageError if lmms_runner.lmms_available() else PrismError
    with pytest.raises(expected) as info:
        run(cfg)
    text = info.value.message + " " + (info.value.hint or "")
    assert "no_such_task_xyz" in text
    if not lmms_runner.lmms_available():
        assert "pip install lmms-eval" in text and "--tasks synth runs without it" in text
    assert not (tmp_path / "o").exists()


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError):
        eval_config(synth_backend="other")
    with pytest.raises(UsageError):
        resolve(EvalConfig, flags={"tasks": ["synth"]})  # no --ckpt
    with pytest.raises(UsageError):
        run(eval_config(judge="gpt-4o", out="x"))


def test_dry_run_plans_without_writing(tmp_path):
    assert run(eval_config(out=str(tmp_path / "o"), dry_run=True)) is None
    assert not (tmp_path / "o").exists()
