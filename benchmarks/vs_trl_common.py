"""Harness shared by benchmarks/sft_vs_trl.py and benchmarks/rl_vs_trl.py (prism against trl, side by side).

Both benchmarks run every configuration in its own subprocess of the benchmark venv (benchmarks/envs/trl,
made by setup_trl_env.sh), one CPU thread each, and interleave repetitions so load drift on a shared
machine hits every configuration alike. This module holds what both sides need: the single-thread setup
(import it before torch), machine facts, medians, the subprocess driver, a per-step timer for HF/trl
trainers, a capture of trl's profiling_context timings, and a timestamp hook on prism's metrics log.
"""

from __future__ import annotations

import os

# Must happen before torch is imported anywhere in the process.
for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["PRISM_NO_PROGRESS"] = "1"
os.environ.setdefault("ACCELERATE_USE_CPU", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU comparison even where a GPU exists

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"          # git-ignored scratch (prism run dirs, trl output dirs)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def single_thread_torch():
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def targets_met(ratios: dict, targets: dict) -> dict:
    """{ratio name: {"ratio", "target", "met"}} for each ratio a target names (issue 34's targets)."""
    return {name: {"ratio": round(ratios[name], 3), "target": target, "met": ratios[name] >= target}
            for name, target in targets.items() if ratios.get(name) is not None}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "transformers", "trl", "accelerate", "datasets", "tokenizers", "prism-vlm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(), "threads_per_process": 1, **versions()}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def add_driver_args(ap, configs, result: Path) -> None:
    """The options both drivers share, and the hidden ones a worker process is started with."""
    import argparse

    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    ap.add_argument("--configs", default=",".join(configs))
    ap.add_argument("--out", default=str(result))
    ap.add_argument("--note", default="")
    ap.add_argument("--worker", choices=configs, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)


def serve_worker(a, trl_worker, prism_worker) -> bool:
    """In a worker process (--worker CONFIG): run that configuration, write its JSON result, return True."""
    if not a.worker:
        return False
    a.config = a.worker
    res = trl_worker(a) if a.worker.startswith("trl") else prism_worker(a)
    Path(a.result).write_text(json.dumps(res, default=str))
    return True


def run_worker(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Run `python script --worker ... --result FILE` in a fresh process; return its JSON result."""
    WORK.mkdir(parents=True, exist_ok=True)
    result_file = WORK / f"result-{os.getpid()}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(script), *args, "--result", str(result_file)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        raise RuntimeError(f"worker {' '.join(args)} failed (rc {proc.returncode}):\n{tail}")
    res = json.loads(result_file.read_text())
    result_file.unlink()
    res["process_wall_s"] = wall
    return res


def write_result(path: Path, obj: dict) -> None:
    """Write the JSON result; this machine's home directory is written as ~ (results are shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=1, default=str).replace(str(Path.home()), "~")
    path.write_text(text + "\n")
    print("wrote", path)


# ------------------------------------------------------------------------------------------ trl side

class TrlProfile:
    """Collects trl's profiling_context durations (trl normally only forwards them to wandb/mlflow)."""

    def __init__(self):
        from trl.extras import profiling

        self.events: list[tuple[str, float, float]] = []   # (name, seconds, perf_counter at its end)
        original = profiling.ProfilingContext._log_metrics
        sink = self.events

        def capture(ctx, duration):
            sink.append((ctx.name, duration, time.perf_counter()))
            return original(ctx, duration)

        profiling.ProfilingContext._log_metrics = capture

    def between(self, t0: float, t1: float) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for name, seconds, t_end in self.events:
            if t0 <= t_end <= t1:
                out[name] += seconds
        return dict(out)


def trl_step_timer(profile: TrlProfile | None = None):
    """A TrainerCallback timing each optimizer step end to end: from the previous step's end (or the
    start of training) to this step's end, so data loading and collation are inside the step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self._prev = None

        def on_train_begin(self, args, state, control, **kw):
            self._prev = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter()
            rec = {"step": state.global_step, "step_s": t - self._prev}
            if profile is not None:
                rec["profile"] = profile.between(self._prev, t)
            self._prev = t
            self.steps.append(rec)

    return StepTimer()


# ------------------------------------------------------------------------------------------ prism side

def timestamp_prism_metrics() -> list[float]:
    """Record perf_counter at every metrics.jsonl append of a prism run in this process (the file
    itself is untouched): consecutive differences are end-to-end step times."""
    from stages.common.contract import checkpoint
    stamps: list[float] = []
    original = checkpoint.Run.log_metrics

    def log_metrics(self, record):
        stamps.append(time.perf_counter())
        return original(self, record)

    checkpoint.Run.log_metrics = log_metrics
    return stamps


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
