"""Peak memory of discriminator scoring (forward + backward) against response length: one row per group
(`whole`: the [T, T] mask and every activation grow with the group) vs the token budget (`budget`: rows and
chunks of at most --budget tokens, backward chunk by chunk).

Each (layout, length) runs in its own process; memory is the peak resident set above the process's state
just before scoring (VmHWM after a reset through /proc/self/clear_refs, glibc's mmap threshold pinned), or
torch.cuda.max_memory_allocated on a GPU. The growth exponent is the log-log slope of the peak between the
two longest lengths: about 1 is linear, about 2 quadratic. Writes benchmarks/results/disc_scoring_memory.json.

    python benchmarks/disc_scoring_memory.py                   # tiny MoE discriminator, CPU, ~2-4 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "the red circle is left of two blue squares so count them and add three then answer".split()


def worker(args) -> dict:
    import torch

    from benchmarks.memory_plan_check import Meter
    from stages.align.scoring import score_groups
    from stages.common.models.discriminator import upcycle
    from stages.common.models.loading import load_processor
    from stages.common.data.chat import rollout_prompt
    from stages.common.world import synth

    torch.set_num_threads(1)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    processor = load_processor("tiny")
    disc = upcycle("tiny", seed=1, device=device)
    disc.train()
    if args.checkpointing:
        disc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    text = " ".join(WORDS[i % len(WORDS)] for i in range(2 * args.length))
    segments = [text] * (2 * (args.rollouts + 1))      # teacher caption, think; n captions; n thinks
    budget = None if args.layout == "whole" else args.budget

    def step():
        disc.zero_grad(set_to_none=True)
        result = score_groups(disc, processor, [rollout_prompt(synth.load('synth:train:1')[0])], [segments], "shared", output_router_logits=True,
                              max_segment_tokens=args.length, max_row_tokens=budget)
        # chunked scores (the budget's rows) are backpropagated by re-running each chunk (ScoreResult.backward)
        result.backward(torch.cat(result.scores).sum() + 0.01 * result.aux_loss)
        return result

    step()                                             # warm-up: kernels, allocator
    disc.zero_grad(set_to_none=True)
    meter = Meter(device)
    base = meter.current()
    meter.reset_peak()
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    return {"layout": args.layout, "length": args.length, "peak_bytes": meter.peak() - base,
            "tokens": result.num_tokens, "rows": result.num_rows, "seconds": round(seconds, 3)}


def slope(points: list[dict]) -> float:
    a, b = sorted(points, key=lambda p: p["length"])[-2:]
    return math.log(b["peak_bytes"] / a["peak_bytes"]) / math.log(b["length"] / a["length"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="256,512,1024,2048")
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--checkpointing", action="store_true", default=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "disc_scoring_memory.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="budget", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    lengths = [int(x) for x in args.lengths.split(",")]
    runs = []
    for layout in ("whole", "budget"):
        for length in lengths:
            cmd = [sys.executable, __file__, "--worker", "--layout", layout, "--length", str(length),
                   "--rollouts", str(args.rollouts), "--budget", str(args.budget), "--device", args.device]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            if proc.returncode:
                raise SystemExit(f"{layout} {length}: {proc.stderr[-2000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    result = {
        "benchmark": "discriminator scoring peak memory vs response length (fwd+bwd, one group)",
        "model": "tiny MoE discriminator (upcycled tiny, 4 experts top-2), fp32, gradient checkpointing",
        "group": f"1 prompt (64x48 image) x 2 x ({args.rollouts} rollouts + teacher) segments of `length` tokens",
        "budget_tokens": args.budget, "runs": runs,
        "growth_exponent": {layout: round(slope([r for r in runs if r["layout"] == layout]), 2)
                            for layout in ("whole", "budget")},
        "baseline": "whole: the group in one row (one dense [T, T] mask), the layout before the token budget",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "load_average": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["growth_exponent"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
