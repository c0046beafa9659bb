"""Rollout/update overlap (`--overlap 1`) against the synchronous step, for rl (grpo) and align, on the tiny model.

Both stages start from the same SFT'd tiny policy (made once here, as the tests' sft_tiny fixture makes it: it
has learnt the response format, so the reward moves) and run the same steps with the same seeds:

    sync        --overlap 0 (the default): rollout, then update, one after the other
    overlap     --overlap 1 --tis-cap 2: step t+1's first batch generated in a worker thread during step t's update
    sync-t2     --overlap 0 with two intra-op threads: the synchronous step given the second core too (overlap
                runs two threads, each with one intra-op thread; without this row the comparison would credit
                overlap with a core the synchronous run never used)

Every configuration runs in its own process, one intra-op thread (sync-t2: two), rounds interleaved so load
drift on a shared machine hits each alike. Step time: end to end, metrics.jsonl append to append (the first
game step of every run is a warm-up and dropped); the median over rounds and steps. The splits come from the
runs' own time/rollout, time/update (align: time/score + time/disc_update + time/policy_update) and, with
overlap, time/rollout_ahead (the worker's generation) and time/rollout_wait (what the step still waited for it).
The reward curves: per-step reward/mean (align: also the discriminator gaps), round 1's run of each.

    python benchmarks/overlap.py [--rounds 3] [--rl-steps 16] [--align-steps 12]
Writes benchmarks/results/overlap.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl_common as H  # noqa: E402  (single-thread env before torch)

CONFIGS = ("rl-sync", "rl-overlap", "rl-sync-t2", "align-sync", "align-overlap", "align-sync-t2")
RESULT = H.RESULTS / "overlap.json"
SFT_DIR = H.WORK / "overlap-sft"
SEED = 0
RL = dict(algo="grpo", data=["synth:train:512"], prompts_per_step=4, rollouts_per_prompt=8, max_new_tokens=64,
          lr=1e-4, warmup=0, engine="hf", seed=SEED, save_every=10**9)
ALIGN = dict(data=["synth:train:256"], prompts_per_step=4, rollouts_per_prompt=8, max_new_tokens=64, lr=2e-5,
             disc_lr=1e-4, warmup_steps=10, warmup_prompts=32, warmup_batch=8, warmup_lr=1e-3, engine="hf",
             seed=SEED, save_every=10**9)
OVERLAP = dict(overlap=1, tis_cap=2.0)
SYNC = dict(overlap=0, tis_cap=2.0)   # the same correction on both sides: only the overlap differs


def sft_policy() -> Path:
    """The tiny model after the tests' SFT (200 steps on oracle demonstrations); made once, reused."""
    if (SFT_DIR / "prism.json").is_file():
        return SFT_DIR
    H.single_thread_torch()
    from stages.common.contract import config
    from stages.sft.config import SFTConfig
    from stages.sft.run import run

    run(config.resolve(SFTConfig, flags=dict(ckpt="tiny", data=["synth:train:1024"], out=str(SFT_DIR), overwrite=True,
                                             lr=3e-3, batch_size=16, micro_batch_size=8, max_steps=200, warmup=0.05,
                                             eval_every=1000, save_every=1000, seed=SEED)))
    return SFT_DIR


def prism_worker(a) -> dict:
    """One run of one configuration in this process; its step times, splits and per-step curves."""
    torch = H.single_thread_torch()
    if a.config.endswith("-t2"):
        torch.set_num_threads(2)
    from stages.common.contract import checkpoint, config

    stamps: list[tuple[float, dict]] = []
    original = checkpoint.Run.log_metrics

    def log_metrics(self, record):
        stamps.append((time.perf_counter(), dict(record)))
        return original(self, record)

    checkpoint.Run.log_metrics = log_metrics
    stage, mode = a.config.split("-", 1)
    flags = dict(RL if stage == "rl" else ALIGN, steps=a.steps, ckpt=str(SFT_DIR), out=str(H.WORK / f"ov-{a.config}"),
                 overwrite=True, **(OVERLAP if mode == "overlap" else SYNC))
    if stage == "rl":
        from stages.rl.config import RLConfig as Config
        from stages.rl.run import run
    else:
        from stages.align.config import AlignConfig as Config
        from stages.align.run import run
    t0 = time.perf_counter()
    run(config.resolve(Config, flags=flags))
    total = time.perf_counter() - t0
    game = [(t, r) for t, r in stamps if "reward/mean" in r]       # rl steps, align game steps (not warmup)
    step_s = [t1 - t0 for (t0, _), (t1, _) in zip(game, game[1:])]   # from the 2nd step: the 1st is a warm-up
    records = [r for _, r in game]
    keep = ("reward/mean", "acc/mean", "gap/caption", "gap/think", "rollout/policy_lag", "rollout/gap_mean_abs",
            "update/tis_weight_mean")
    return {"config": a.config, "step_s": step_s, "total_s": total, "threads": torch.get_num_threads(),
            "times": [{k: v for k, v in r.items() if k.startswith("time/")} for r in records],
            "curve": [{k: r[k] for k in ("step", *keep) if k in r} for r in records]}


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, reps in runs.items():
        steps = [s for rep in reps for s in rep["step_s"]]
        times = [t for rep in reps for t in rep["times"][1:]]
        split = {}
        for key in sorted({k for t in times for k in t}):
            split[key] = H.median([t.get(key) for t in times])
        out[name] = {"median_step_s": H.median(steps), "per_round_median_s": [H.median(r["step_s"]) for r in reps],
                     "median_split_s": split, "threads": reps[0]["threads"], "curve": reps[0]["curve"],
                     "total_s": [r["total_s"] for r in reps]}
    for stage in ("rl", "align"):
        sync, ahead, t2 = (out.get(f"{stage}-{m}") for m in ("sync", "overlap", "sync-t2"))
        if sync and ahead:
            out[f"{stage}-speedup"] = sync["median_step_s"] / ahead["median_step_s"]
        if t2 and ahead:
            out[f"{stage}-speedup-vs-sync-t2"] = t2["median_step_s"] / ahead["median_step_s"]
        if sync:   # the arithmetic on free hardware: (R + U) / max(R, U), R the rollout, U the rest of the step
            split = sync["median_split_s"]
            rollout = split.get("time/rollout", 0.0)
            rest = sum(v for k, v in split.items() if k != "time/rollout")
            out[f"{stage}-ideal-speedup"] = (rollout + rest) / max(rollout, rest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    H.add_driver_args(ap, CONFIGS, RESULT)
    ap.add_argument("--rl-steps", type=int, default=16)
    ap.add_argument("--align-steps", type=int, default=12)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if H.serve_worker(a, None, prism_worker):
        return
    configs = a.configs.split(",")
    load_before = H.load_average()
    started = H.now_iso()
    sft_policy()
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(a.rounds):
        for c in configs:
            steps = a.rl_steps if c.startswith("rl") else a.align_steps
            res = H.run_worker(Path(__file__), ["--worker", c, "--steps", str(steps)])
            runs[c].append(res)
            print(f"round {r + 1} {c}: median step {H.median(res['step_s']):.3f}s (load {H.load_average()})",
                  flush=True)
    H.write_result(Path(a.out), {
        "benchmark": "overlap", "started": started, "finished": H.now_iso(), "machine": H.machine(),
        "load_average_before": load_before, "load_average_after": H.load_average(), "rounds": a.rounds,
        "rl": RL, "align": ALIGN, "sft": str(SFT_DIR.relative_to(H.ROOT)), "note": a.note,
        "summary": summarize(runs), "runs": runs})


if __name__ == "__main__":
    main()
