"""--report-to tensorboard,wandb in sft, align and rl (issue 19): every stage's per-step metrics arrive in
tensorboard's event files and in wandb's offline run (read back from the files each tracker wrote).
Each stage runs on the tiny model from scratch for a step or two; the numbers are not the point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_stage


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list] = {}
    for events in out.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


def wandb_history(out: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    rows = []
    for path in out.glob("wandb/offline-run-*/run-*.wandb"):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_trackers(out: Path, keys: list[str]) -> None:
    logged = [r for r in metrics(out) if r.get("step", 0) > 0 or "eval/seconds" in r]   # step 0: the input's evaluation
    scalars = tensorboard_scalars(out)
    history = wandb_history(out)
    for key in keys:
        want = [(r["step"], r[key]) for r in logged if isinstance(r.get(key), (int, float))]
        assert want, key
        assert [s for s, _ in sorted(scalars.get(key, []))] == [s for s, _ in want], (key, sorted(scalars))
        assert [v for _, v in sorted(scalars[key])] == pytest.approx([v for _, v in want], rel=1e-5)
        got = [(h["_step"], h[key]) for h in history if key in h]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in want], (key, history[:2])
    prism = json.loads((out / "prism.json").read_text())
    assert any(f.startswith("wandb/") for f in prism["files"]) and any("tfevents" in f for f in prism["files"])


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_sft_metrics_reach_tensorboard_and_wandb(tmp_path):
    from stages.sft.config import SFTConfig
    from stages.sft.run import run

    out = run_stage(SFTConfig, run, ckpt="tiny", data=["synth:train:8"], out=str(tmp_path / "sft"), batch_size=2,
                    micro_batch_size=2, max_steps=2, eval_fraction=0.25, eval_every=1, log_every=1,
                    report_to="tensorboard,wandb", seed=0)
    check_trackers(out, ["loss", "lr", "eval_loss", "tokens_per_s"])


def test_rl_metrics_reach_tensorboard_and_wandb(tmp_path):
    from stages.rl.config import RLConfig
    from stages.rl.run import run

    out = run_stage(RLConfig, run, algo="grpo", ckpt="tiny", data=["synth:train:8"], out=str(tmp_path / "rl"),
                    steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8, engine="hf", warmup=0,
                    report_to="tensorboard,wandb", seed=0, eval_tasks=["synth"], eval_every=1, eval_n=2)
    check_trackers(out, ["reward/mean", "acc/mean", "response_length/mean", "lr", "eval/synth/acc",
                         "eval/synth/caption_f1", "eval/seconds"])


def test_align_metrics_reach_tensorboard_and_wandb(tmp_path):
    from stages.align.config import AlignConfig
    from stages.align.run import run

    out = run_stage(AlignConfig, run, ckpt="tiny", data=["synth:train:8"], out=str(tmp_path / "align"),
                    steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8, warmup_steps=1,
                    warmup_prompts=2, warmup_batch=2, report_to="tensorboard,wandb", seed=0)
    last = metrics(out)[-1]
    keys = [k for k in ("gap/caption", "gap/think", "d/acc_caption", "update/entropy") if isinstance(last.get(k), (int, float))]
    assert len(keys) >= 3, sorted(last)
    check_trackers(out, keys)
