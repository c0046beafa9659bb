"""The device kit (benchmarks/device/): the pieces that run fast here. The whole command in its CPU mode is
benchmarks/device/rehearse.sh (CI), not a test: it builds a venv of the GPU image's versions."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "device"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import check  # noqa: E402


def _part(parts: Path, step: str, status: str, figures: dict, mode: str = "gpu") -> None:
    check.write_json(parts / f"{step}.json", {"step": step, "mode": mode, "status": status, "figures": figures})


ENV = {"versions": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"}, "missing": []}
STAGES = {"gpu_check": {"stages": {"sft": {"step_s": 0.812, "mfu": 0.41, "peak_gib": 30.1, "plan_gib": 31.0}}}}


def test_machine_name_is_a_file_name_slug():
    assert check.machine_name("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert check.machine_name("NVIDIA H200") == "h200"
    assert re.fullmatch(r"[a-z0-9-]+", check.machine_name("Tesla T4 (PCIe) / x"))


def test_collect_names_the_machine_and_summarises_every_step(tmp_path):
    parts, results = tmp_path / "parts", tmp_path / "results"
    _part(parts, "env", "ok", ENV)
    _part(parts, "stages", "ok", STAGES)
    result = check.collect(parts, results)
    written = json.loads((results / "gpu_check-h100-80gb-hbm3.json").read_text())
    assert written == result and result["machine"] == "h100-80gb-hbm3" and result["mode"] == "gpu"
    line = result["summary"]
    assert "\n" not in line and line.startswith("device check [gpu, h100-80gb-hbm3] 2/6 steps ok")
    assert "sft 0.812 s mfu 0.41 peak/plan 30.1/31 GiB" in line
    for step in ("cli", "rollout", "disc_memory", "attention"):
        assert f"{step}: not run" in line


def test_a_step_cut_short_keeps_its_figures_and_is_marked(tmp_path):
    parts = tmp_path / "parts"
    _part(parts, "env", "ok", ENV)
    _part(parts, "cli", "running", {"sft": {"wall_s": 40.0, "rc": 0, "peak_gib": 20.0}})
    result = check.collect(parts, tmp_path, step="cli", rc=124)
    cli = result["steps"]["cli"]
    assert cli["status"] == "timed out" and cli["rc"] == 124 and cli["figures"]["sft"]["wall_s"] == 40.0
    assert "cli: timed out (sft 40 s peak/plan 20/- GiB)" in result["summary"]
    # a step that exits 0 but never finished its part is not counted as ok
    _part(parts, "rollout", "running", {})
    assert check.collect(parts, tmp_path, step="rollout", rc=0)["steps"]["rollout"]["status"] == "failed"
    # a step that failed outright
    assert check.collect(parts, tmp_path, step="attention", rc=1)["steps"]["attention"]["status"] == "failed"


def test_a_rerun_merges_into_the_earlier_results(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    _part(first, "env", "ok", ENV)
    _part(first, "stages", "ok", STAGES)
    _part(first, "cli", "timed out", {})
    earlier = check.collect(first, first)
    monkeypatch.setenv("PRISM_DEVICE_MERGE", str(first / f"gpu_check-{earlier['machine']}.json"))
    _part(second, "cli", "ok", {"sft": {"wall_s": 50.0, "rc": 0}})
    merged = check.collect(second, second)
    assert merged["steps"]["stages"]["status"] == "ok" and merged["steps"]["cli"]["status"] == "ok"
    assert merged["machine"] == "h100-80gb-hbm3"


def test_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PRISM_DEVICE_MODE", "cpu")
    assert check.mode() == "cpu"
    monkeypatch.setenv("PRISM_DEVICE_MODE", "tpu")
    with pytest.raises(SystemExit, match="PRISM_DEVICE_MODE"):
        check.mode()


def test_cpu_mode_shrinks_every_shape(tiny_path):
    import gpu_check

    processor = gpu_check.shape_processor()
    gpu, cpu = (gpu_check.shape_config(m, processor.tokenizer) for m in ("gpu", "cpu"))
    assert gpu.text_config.hidden_size == 2048 and gpu.text_config.num_hidden_layers == 28
    assert cpu.text_config.hidden_size == 64 and cpu.text_config.num_hidden_layers == 2
    assert cpu.vision_config.depth == 1 and gpu.vision_config.depth == 24
    big, small = check.SIZES["gpu"], check.SIZES["cpu"]
    assert set(big) == set(small)
    assert max(small["disc"]["lengths"]) < min(big["disc"]["lengths"])
    assert max(small["attention"]["lengths"]) < min(big["attention"]["lengths"])
    assert small["cli_rl"]["new"] < big["cli_rl"]["new"] and small["cli_sft"]["samples"] <= big["cli_sft"]["samples"]


def test_growth_exponent_and_planned_peak():
    pts = [{"length": 100, "peak_bytes": 1000}, {"length": 200, "peak_bytes": 4000},
           {"length": 400, "peak_bytes": 16000}]
    assert check.growth_exponent(pts) == pytest.approx(2.0)
    assert check.planned_peak_gib("│ verdict │ │ fits: peak 12.34 GiB (update) of 80.00 GiB per │") == 12.34
    assert check.planned_peak_gib("no plan here") is None


def test_the_attention_step_runs_in_cpu_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_DEVICE_MODE", "cpu")
    assert check.main(["attention", "--parts", str(tmp_path)]) == 0
    part = json.loads((tmp_path / "attention.json").read_text())
    assert part["status"] == "ok" and "flash-attn" in part["figures"]["note"]
    timed = [c for c in part["figures"]["cases"] if "ms" in c]
    assert {c["mask"] for c in timed} == {"none (is_causal)", "explicit [T, T]"}
    assert all(c["ms"] > 0 for c in timed)


def test_kit_names_pinned_versions_of_the_lock():
    lock = {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / ".ci" / "constraints.txt").read_text(), re.M)}
    lines = [x.strip() for x in (ROOT / "benchmarks" / "device" / "kit.txt").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines
    for line in lines:
        name, _, version = line.partition("==")
        assert version, f"{line}: pin a version"
        assert lock.get(name.lower().replace("_", "-")) == version, line
    # what the GPU image lacks and the device command imports is in the kit
    assert {"math_verify"} <= set(check.REQUIRED) and "math-verify==0.9.0" in lines


def test_a_missing_plotting_library_costs_a_warning_not_the_checkpoint(tmp_path, monkeypatch, tiny_path):
    """Without matplotlib a stage still writes its checkpoint (manifest included); the plot is skipped with
    one warning line."""
    from prism_cli.app import app
    from stages.common.contract.checkpoint import MANIFEST

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "sft"
    result = CliRunner().invoke(app, ["sft", "--ckpt", "tiny", "--data", "synth:train:4", "--max-steps", "1",
                                      "--batch-size", "2", "--micro-batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / MANIFEST).is_file() and (out / "model").is_dir()
    assert not (out / "loss.png").exists()
    warnings = [x for x in result.stderr.splitlines() if x.startswith("warning: no plot drawn")]
    assert len(warnings) == 1 and "matplotlib" in warnings[0]


def test_plots_without_matplotlib_return_none(tmp_path, monkeypatch):
    from stages.common.contract import plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    assert plots.plot_curves(records, {"loss": "loss"}, tmp_path / "a.png", "t") is None
    assert plots.plot_panels(records, {"p": {"loss": "loss"}}, tmp_path / "b.png", "t") is None
    assert plots.plot_eval({"task": {"value": 0.5, "n": 2}}, tmp_path / "c.png", "t") is None
    assert not list(tmp_path.iterdir())
