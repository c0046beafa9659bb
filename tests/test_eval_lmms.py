"""lmms-eval integration, fully offline: the prism model through the `lmms_eval.models` entry point on synth
as a local --include_path parquet task (lmms-eval CLI, results JSON read back), and `prism eval` running synth
through lmms-eval in process. Skipped where lmms-eval (the eval extra) is not installed."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

from stages.common.contract.config import resolve  # noqa: E402
from stages.common.world.synth import load  # noqa: E402
from stages.eval.config import EvalConfig  # noqa: E402
from stages.eval.run import run  # noqa: E402
from stages.eval.synth_native import write_lmms_task  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_entry_point_registers_the_prism_model():
    from lmms_eval.models import get_model

    from stages.eval.lmms_plugin import PrismLMM

    assert get_model("prism") is PrismLMM


def test_lmms_eval_cli_runs_prism_on_the_local_synth_task(tmp_path, tiny_path):
    task_dir = write_lmms_task(tmp_path / "task", load("synth:test:4"), max_new_tokens=8)
    out = tmp_path / "lmms_out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "prism",
           "--model_args", "pretrained=tiny,engine=hf,max_new_tokens=8", "--batch_size", "4",
           "--tasks", "prism_synth", "--include_path", str(task_dir), "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    # lmms-eval 0.7.3 exits 0 even when evaluation raised: look for the traceback too
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
    results_files = list(out.glob("*/*_results.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())
    synth = results["results"]["prism_synth"]
    assert {"acc,none", "format,none", "caption_f1,none"} <= set(synth)
    assert results["n-samples"]["prism_synth"]["effective"] == 4
    samples = list(out.glob("*/*_samples_prism_synth.jsonl"))[0].read_text().splitlines()
    assert len(samples) == 4 and "acc" in json.loads(samples[0])


def test_prism_eval_runs_synth_through_lmms_eval(tmp_path, tiny_path):
    cfg = resolve(EvalConfig, flags={"ckpt": ["tiny"], "tasks": ["synth"], "synth_backend": "lmms", "limit": 3,
                                     "max_new_tokens": 8, "engine": "hf", "out": str(tmp_path / "ev")})
    out = run(cfg)
    synth = json.loads((out / "results.json").read_text())["tasks"]["synth"]
    assert synth["n"] == 3 and synth["lmms_tasks"] == ["prism_synth"] and "caption_f1" in synth["extra"]
    assert "perception_errors" in synth["extra"]
    rows = (out / "samples" / "synth.jsonl").read_text().splitlines()
    assert len(rows) == 3 and json.loads(rows[0])["response"]


def test_reply_is_the_answer_for_official_tasks_and_everything_for_overrides():
    from stages.eval.lmms_plugin import reply_text, sampling_for

    text = "<caption>c</caption><think>t</think><answer>42</answer>"
    assert reply_text(text, "mathvista_testmini_cot") == "42"
    assert reply_text(text, "prism_mmmu_val") == text
    assert reply_text("no tags", "mmmu_val") == "no tags"
    params = sampling_for({"max_new_tokens": 16384, "until": ["Q:"], "temperature": 0}, cap=512)
    assert params.temperature == 0.0 and params.max_new_tokens == 512 and params.stop == []
