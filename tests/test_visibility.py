"""Tracking and visibility (issue 19): a plain progress line in job logs (stdout/stderr not a terminal),
tracker names checked at config resolution, tracker-safe config values and metrics."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from stages.common.contract import console, tracking
from stages.common.contract.errors import UsageError


@pytest.fixture()
def log_console(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buf, force_terminal=False, width=60))
    monkeypatch.delenv("PRISM_NO_PROGRESS", raising=False)
    monkeypatch.delenv("PRISM_PROGRESS_EVERY", raising=False)
    now = [1000.0]
    monkeypatch.setattr(console, "clock", lambda: now[0])
    monkeypatch.setattr(console, "HEARTBEAT", False)  # a fake clock: only the lines advance() prints
    return buf, now


def test_plain_progress_line_at_least_every_30_seconds_when_not_a_terminal(log_console):
    buf, now = log_console
    with console.progress("sft", total=100) as bar:
        for step in range(100):
            now[0] += 7.0   # a 7 s step: 700 s in all
            bar.advance(status=f"loss {1 / (step + 1):.3f}")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("sft 0/100 (0%) elapsed 0:00:00")
    assert lines[-1].startswith("sft 100/100 (100%) elapsed 0:11:40") and lines[-1].endswith("| loss 0.010")
    # a line as soon as 30 s have passed (so never more than 30 s + one step apart), not one per step
    seconds = [sum(int(x) * m for x, m in zip(line.split("elapsed ")[1][:7].split(":"), (3600, 60, 1)))
               for line in lines[1:-1]]
    gaps = [b - a for a, b in zip([0] + seconds, seconds)]
    assert gaps and all(30 <= g <= 30 + 7 for g in gaps), gaps
    assert "sft 5/100 (5%) elapsed 0:00:35 eta 0:11:05 | loss 0.200" in lines


def test_progress_interval_can_be_set(log_console, monkeypatch):
    buf, now = log_console
    monkeypatch.setenv("PRISM_PROGRESS_EVERY", "1")
    with console.progress("rl (dapo)", total=3) as bar:
        for _ in range(3):
            now[0] += 1.5
            bar.advance()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4, lines  # start, 3 steps; the last step's line is not printed twice
    assert lines[-1].startswith("rl (dapo) 3/3 (100%)")


def test_a_long_step_prints_a_line_every_interval_naming_its_phase(monkeypatch):
    """A job log (not a terminal) of a step slower than the interval: lines keep coming within the step."""
    import time

    from stages.common.training.runtime import StepTimer

    buf = io.StringIO()
    monkeypatch.setattr(console, "err", Console(file=buf, force_terminal=False, width=200))
    monkeypatch.delenv("PRISM_NO_PROGRESS", raising=False)
    monkeypatch.setenv("PRISM_PROGRESS_EVERY", "0.2")
    timer = StepTimer()
    with console.progress("rl (grpo)", total=1) as bar:
        with timer.phase("rollout"):
            time.sleep(1.5)   # a step 7.5 times the interval
        bar.advance()
    lines = buf.getvalue().splitlines()
    within = [line for line in lines if line.startswith("rl (grpo) 0/1") and "| in rollout for 0:00:0" in line]
    assert len(within) >= 3, lines
    assert lines[-1].startswith("rl (grpo) 1/1 (100%)") and "in rollout" not in lines[-1]
    assert timer.pop()["time/rollout"] >= 1.5


def test_report_to_names_and_packages_are_checked(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")   # a wandb login is checked too (the test below)
    assert tracking.parse("none") == [] and tracking.parse("") == []
    assert tracking.parse("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(UsageError, match="unknown tracker 'tensorbord'"):
        tracking.parse("tensorbord")
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="the tensorboard package is not installed, so nothing would be logged"):
        tracking.parse("tensorboard")


def test_report_to_is_checked_when_the_config_is_resolved():
    from stages.common.contract import config
    from stages.rl.config import RLConfig

    with pytest.raises(UsageError, match="unknown tracker 'tb'"):
        config.resolve(RLConfig, flags=dict(ckpt="tiny", report_to="tb", dry_run=True))


def test_clean_config_and_numeric_metrics():
    cleaned = tracking.clean_config({"data": ["a", "b"], "clip_high": None, "lr": 1e-5, "set": {"x": 1}, "ok": True})
    assert cleaned == {"data": "a,b", "clip_high": "none", "lr": 1e-5, "set": '{"x": 1}', "ok": True}
    assert tracking.numeric({"step": 3, "loss": 0.5, "grad_norm": None, "tag": "x", "nan": float("nan"),
                             "flag": True}) == {"step": 3.0, "loss": 0.5}


def test_rl_plot_has_kl_entropy_length_and_clip_panels(tmp_path):
    from stages.common.contract.plots import panel_data, plot_eval, plot_panels
    from stages.rl.run import RL_PANELS

    records = [{"step": s, "reward/mean": 0.1 * s, "acc/mean": 0.2, "format/mean": 1.0, "update/kl": 0.01 * s,
                "update/entropy": 2.0 - 0.1 * s, "response_length/mean": 30 + s, "response_length/max": 64,
                "update/clipfrac": 0.05, "grad_norm": None} for s in range(1, 6)]
    drawn = panel_data(records, RL_PANELS)
    assert set(drawn) == {"reward", "KL", "entropy", "response length", "clip fraction"}
    assert drawn["KL"] == {"KL to reference": [(s, 0.01 * s) for s in range(1, 6)]}
    assert plot_panels(records, RL_PANELS, tmp_path / "rl.png", "rl").stat().st_size > 1000
    assert plot_panels([{"step": 1}], RL_PANELS, tmp_path / "none.png", "rl") is None
    results = {"synth": {"value": 0.5, "stderr": 0.05, "n": 100}, "mmmu": {"value": 0.3, "stderr": 0.02, "n": 900}}
    assert plot_eval(results, tmp_path / "eval.png", "eval").stat().st_size > 1000


def test_only_the_main_process_writes_plots_and_never_a_half_written_one(tmp_path, monkeypatch):
    """Every rank reaches a stage's plotting line; a rank > 0 rewriting the PNG while rank 0 hashed the run
    directory left a manifest that no longer matched drift_gap.png (a CI failure under torchrun)."""
    from stages.common.contract.plots import plot_curves, plot_eval, plot_panels
    from stages.rl.run import RL_PANELS

    records = [{"step": s, "reward/mean": 0.1 * s, "loss": 1.0 / s} for s in range(1, 4)]
    results = {"synth": {"value": 0.5, "stderr": 0.05, "n": 100}}
    monkeypatch.setenv("RANK", "1")
    assert plot_panels(records, RL_PANELS, tmp_path / "rl.png", "rl") is None
    assert plot_curves(records, {"loss": "loss"}, tmp_path / "loss.png", "sft") is None
    assert plot_eval(results, tmp_path / "eval.png", "eval") is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    assert plot_curves(records, {"loss": "loss"}, tmp_path / "loss.png", "sft").read_bytes()[:4] == b"\x89PNG"
    assert plot_panels(records, RL_PANELS, tmp_path / "rl.png", "rl").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "rl.png"]    # no .tmp left behind


def test_report_to_wandb_without_a_login_is_one_line_before_anything_is_written(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    from typer.testing import CliRunner

    from prism_cli.app import app

    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.org login me password x\n")
    monkeypatch.setenv("NETRC", str(netrc))
    out = tmp_path / "sft"
    for extra in (["--dry-run"], []):
        result = CliRunner().invoke(app, ["sft", "--ckpt", "tiny", "--data", "synth:train:8", "--report-to", "wandb",
                                          "--out", str(out), *extra])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "--report-to wandb: no wandb login" in lines[0] and "wandb login" in lines[0]
        assert not out.exists()
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert tracking.parse("wandb") == ["wandb"]
    netrc.write_text("")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.parse("wandb") == ["wandb"]
