"""`prism curate --batch` at scale: 10,000 problems through the fake Gemini Batch API, against interactive mode.

Both modes run the real CLI (`python -m prism_cli curate`) in a child process against the fake server in a
second process (real google-genai client, real cache, gate and checkpoint). For each mode: wall time, wall
time less the fake's configured delay (batch: `--batch-delay` once per round; interactive: no latency is
configured, so nothing to subtract), the CLI process's own CPU time (user + sys, from wait4: time curate
spends, never time it waits), its peak RSS, and the HTTP requests the server saw. A third run, `--dry-run`,
measures the fixed part both modes share (start-up, loading and generating the problems, the cost plan):
`*_less_fixed` subtracts it, leaving what the teacher path itself costs.

Baseline: interactive mode (`prism curate` without --batch) on the same problems. The ratios are batch /
interactive: < 1 means batch mode costs curate less. Both modes pay the same synth generation (~13 s for
10,000 problems here) and CLI start-up; `--gate format --attempts 1` keeps batch mode to one round (the
fake's default answer is not the synth ground truth). Results: benchmarks/results/curate_batch.json.

    python benchmarks/curate_batch.py [--n 10000] [--batch-delay 2] [--shard 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key-not-a-secret"


def start_fake(batch_delay: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "tests.fakes.gemini_server", "--batch-delay", str(batch_delay)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def fake_stats(url: str) -> dict:
    import httpx

    return httpx.get(url + "/_stats").json()


def run_mode(n: int, batch: bool, batch_delay: float, shard: int, concurrency: int, dry_run: bool = False) -> dict:
    proc, url = start_fake(batch_delay if batch else 0.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            env = {**os.environ, "GEMINI_API_KEY": KEY, "PRISM_GEMINI_BASE_URL": url, "PRISM_NO_PROGRESS": "1",
                   "PYTHONPATH": str(REPO)}
            env.pop("GOOGLE_API_KEY", None)
            args = [sys.executable, "-m", "prism_cli", "curate", "--source", f"synth:train:{n}", "--out", str(out),
                    "--gate", "format", "--attempts", "1", "--concurrency", str(concurrency)]
            if batch:
                args += ["--batch", "--batch-input", "file", "--batch-shard-requests", str(shard),
                         "--batch-poll", "0.5", "--set", "batch_report=5"]
            if dry_run:
                args += ["--dry-run"]
            t0 = time.perf_counter()
            child = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            stderr = child.stderr.read()
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - t0
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode != 0:
                raise SystemExit(f"curate failed ({child.returncode}): {stderr.decode()[-2000:]}")
            summary = {} if dry_run else json.loads((out / "prism.json").read_text())["summary"]
        stats = fake_stats(url)
    finally:
        proc.terminate()
        proc.wait(10)
    waited = batch_delay if batch else 0.0  # one round of jobs: the fake holds them batch_delay seconds
    if dry_run:
        return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    return {"kept": summary["kept"], "wall_s": round(wall, 2), "wall_less_fake_delay_s": round(wall - waited, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "http_requests": stats["http_requests"], "teacher_requests_answered": stats["successes"],
            "batch_calls": stats["batch_calls"], "jobs": stats["jobs"],
            "cost_usd_estimate": summary.get("cost_usd_estimate")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--batch-delay", type=float, default=2.0)
    p.add_argument("--shard", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "curate_batch.json"))
    a = p.parse_args()
    load_before = os.getloadavg()
    batch = run_mode(a.n, True, a.batch_delay, a.shard, a.concurrency)
    interactive = run_mode(a.n, False, 0.0, a.shard, a.concurrency)
    fixed = run_mode(a.n, True, 0.0, a.shard, a.concurrency, dry_run=True)
    for mode in (batch, interactive):
        mode["wall_less_fixed_s"] = round(mode["wall_less_fake_delay_s"] - fixed["wall_s"], 2)
        mode["cpu_less_fixed_s"] = round(mode["cpu_s"] - fixed["cpu_s"], 2)

    def ratio(k: str) -> float:
        return round(batch[k] / interactive[k], 3) if interactive[k] else None

    result = {
        "benchmark": "curate_batch",
        "baseline": "interactive mode (prism curate without --batch), same problems, same fake, no latency",
        "config": {"problems": a.n, "batch_delay_s": a.batch_delay, "shard_requests": a.shard,
                   "concurrency": a.concurrency, "gate": "format", "attempts": 1},
        "batch": batch,
        "interactive": interactive,
        "fixed_dry_run": fixed,
        "ratio_batch_vs_interactive": {k: ratio(k) for k in ("wall_less_fake_delay_s", "wall_less_fixed_s", "cpu_s",
                                                             "cpu_less_fixed_s", "peak_rss_mb", "http_requests",
                                                             "cost_usd_estimate")},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
