"""Greedy evaluation on held-out problems while a stage trains (--eval-tasks, --eval-every, --eval-n), and keeping
the weights of the best evaluation (--keep best:TASK/METRIC) beside the final ones (docs/eval-during-training.md).

The problems are synth's test split (never a training problem), drawn with seed 0 whatever the run's seed, so
runs of several seeds are measured on the same problems; they are scored by stages.common.evaluation.synth, the
code `prism eval` runs. Under several processes each evaluates an equal, padded share (same generate calls on
every rank: lockstep) and the scored records are gathered, so every process computes the same metrics and takes
the same keep-or-not decision.

The best weights live in <out>/best/ (model/ and best.json: metric, step, value). They are written to
best.saving/ and renamed into place, the previous best moved aside first and removed last: a crash leaves either
the old best or the new one whole, never a half-written one, and `recover` puts things right on --resume.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common.contract import checkpoint, console, tracking
from stages.common.contract.samples import Sample
from stages.common.evaluation import synth as synth_eval
from stages.common.evaluation.options import (
    METRIC_PREFIX,
    SYNTH_METRICS,
    eval_due,
    is_better,
    padded,
    parse_keep,
    rank_share,
)
from stages.common.rollout import SamplingParams
from stages.common.training import runtime as training
from stages.common.world import synth as synth_world

HELD_OUT_SEED = 0          # the problems do not move with the run's seed
SAVING = checkpoint.BEST_DIR + ".saving"
ASIDE = checkpoint.BEST_DIR + ".old"


def held_out_problems(spec: str, n: int) -> list[Sample]:
    """The first n problems of a synth test spec, as `prism eval --synth SPEC --limit n --seed 0` evaluates."""
    return synth_world.load(spec, seed=HELD_OUT_SEED)[:n]


@dataclass
class Evaluator:
    """One stage's evaluation during training: what it evaluates, when, and the best kept so far."""

    samples: list[Sample]
    every: int
    max_new_tokens: int
    batch_size: int
    run_path: Path
    keep: str | None = None        # the metrics key --keep best: ranks by
    best: dict | None = None       # {"metric", "step", "value"} of the weights in best/

    @classmethod
    def from_config(cls, cfg, accelerator, run_dir) -> Evaluator | None:
        """None when the config asks for no evaluation (no --eval-tasks). On --resume, the best kept before the
        interruption is recovered and ranks the evaluations to come."""
        if not cfg.eval_tasks:
            return None
        evaluator = cls(samples=held_out_problems(cfg.eval_synth, cfg.eval_n), every=cfg.eval_every,
                        max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                        batch_size=cfg.eval_batch_size, run_path=run_dir.path, keep=parse_keep(cfg.keep))
        if accelerator.is_main_process:
            recover(run_dir.path)
        accelerator.wait_for_everyone()
        if run_dir.resuming and evaluator.keep:
            evaluator.best = saved_best(run_dir.path)
            if evaluator.best is not None:
                console.info(f"resuming with the best {evaluator.keep} {evaluator.best['value']:.4f} of step "
                             f"{evaluator.best['step']} in {run_dir.path / checkpoint.BEST_DIR}")
        console.info(f"held-out evaluation: synth, {len(evaluator.samples)} test problems, greedy, every "
                     f"{evaluator.every} steps and at the end" + (f"; keeping the best {evaluator.keep}"
                                                                   if evaluator.keep else ""))
        return evaluator

    def due(self, step: int, last_step: int) -> bool:
        return eval_due(step, self.every, last_step)

    def baseline(self, run_dir, accelerator, engine, policy, processor, report_to: str) -> None:
        """The input policy's evaluation, logged as step 0: where the curves start. A fresh run only: a resumed
        one has it in its metrics already (or, interrupted before its first save, goes without)."""
        if run_dir.resuming:
            return
        record = {"step": 0, **self(0, accelerator, engine, policy, processor)}
        run_dir.log_metrics(record)
        tracking.log(accelerator, report_to, record, 0)

    def __call__(self, step: int, accelerator, engine, policy, processor) -> dict:
        """Evaluate the current weights (every process together), log a line, keep them if best. Returns the
        metrics: eval/synth/<metric> for each of SYNTH_METRICS, eval/synth/n and eval/seconds."""
        start = time.perf_counter()
        engine.sync_weights(policy.module)
        records = evaluate_share(engine, self.samples, accelerator.process_index, accelerator.num_processes,
                                 SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens, seed=0),
                                 self.batch_size)
        metrics = synth_metrics(records)
        metrics[f"{METRIC_PREFIX}seconds"] = time.perf_counter() - start
        console.info(f"held-out synth at step {step}: acc {metrics['eval/synth/acc']:.3f}, caption F1 "
                     f"{metrics['eval/synth/caption_f1']:.3f}, format {metrics['eval/synth/format']:.3f} on "
                     f"{len(records)} problems ({metrics['eval/seconds']:.1f} s)")
        if self.keep and is_better(metrics[self.keep], None if self.best is None else self.best["value"]):
            record = {"metric": self.keep, "step": step, "value": metrics[self.keep]}
            save_best(accelerator, policy, processor, self.run_path, record)
            self.best = record
            console.info(f"new best {self.keep} {record['value']:.4f} at step {step}: "
                         f"{self.run_path / checkpoint.BEST_DIR}")
        return metrics

    def summary(self, records: list[dict]) -> dict:
        """For the manifest: the last evaluation's metrics, and the best kept (with where it lives)."""
        evals = [r for r in records if f"{METRIC_PREFIX}seconds" in r]
        out = {f"final_{k}": v for k, v in (evals[-1] if evals else {}).items() if k.startswith(METRIC_PREFIX)}
        out["evaluations"] = len(evals)
        if self.best is not None:
            out[checkpoint.BEST_KEY] = dict(self.best, dir=checkpoint.BEST_DIR)
        return out


def evaluate_share(engine, samples: list[Sample], rank: int, world: int, params, batch_size: int) -> list[dict]:
    """Every problem's scored record, in order, on every process: each process generates for its padded share
    (the same number of generate calls everywhere), drops the padding, and the shares are gathered."""
    mine, share = rank_share(len(samples), rank, world)
    records = synth_eval.evaluate(engine, [samples[i] for i in padded(mine, share)], params, batch_size)[:len(mine)]
    if world == 1:
        return records
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, records)
    return [r for part in gathered for r in part]    # contiguous shares in rank order: the problems' order


def synth_metrics(records: list[dict]) -> dict:
    """eval/synth/<metric> from scored records, by the summary `prism eval` writes to results.json."""
    summary = synth_eval.summarize(records)
    values = {"acc": summary["value"], **summary["extra"]}
    return {**{f"{METRIC_PREFIX}synth/{m}": float(values[m]) for m in SYNTH_METRICS},
            f"{METRIC_PREFIX}synth/n": summary["n"]}


# ------------------------------------------------------------------------------------------ the best weights

def save_best(accelerator, policy, processor, run_path: Path, record: dict) -> None:
    """Write the current policy as the best: to best.saving/, then swap it in (see the module docstring).
    Every process calls it (gathering sharded weights is collective); the main process writes."""
    saving, best, aside = run_path / SAVING, run_path / checkpoint.BEST_DIR, run_path / ASIDE
    if accelerator.is_main_process:
        shutil.rmtree(saving, ignore_errors=True)
    training.save_model(accelerator, policy, processor, saving / "model")
    if accelerator.is_main_process:
        (saving / checkpoint.BEST_RECORD).write_text(json.dumps(record, sort_keys=True) + "\n")
        shutil.rmtree(aside, ignore_errors=True)
        if best.exists():
            os.replace(best, aside)
        os.replace(saving, best)
        shutil.rmtree(aside, ignore_errors=True)
    accelerator.wait_for_everyone()


def recover(run_path: Path) -> None:
    """After a crash mid-swap: a half-written best.saving/ is removed; a best moved aside with no new one in its
    place is put back."""
    best, aside = run_path / checkpoint.BEST_DIR, run_path / ASIDE
    shutil.rmtree(run_path / SAVING, ignore_errors=True)
    if aside.is_dir() and not best.exists():
        os.replace(aside, best)
    shutil.rmtree(aside, ignore_errors=True)


def saved_best(run_path: Path) -> dict | None:
    """The record of the best kept in run_path/best/, or None when there is none."""
    try:
        return json.loads((run_path / checkpoint.BEST_DIR / checkpoint.BEST_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
