"""The miniature's held-out curves (recipes/curves-tiny.sh): per seed, align's and then DAPO's greedy accuracy and
caption F1 on held-out synth test problems as they train, read from each run's metrics.jsonl. Writes
OUT.json (every point), OUT.md (per seed: start, best, end, and where the best fell) and OUT.png.

    python benchmarks/held_out_curves.py --curves out/ablation-tiny/curves --seeds 0 1 2 \
        --out benchmarks/results/held-out-curves
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = {"eval/synth/acc": "accuracy", "eval/synth/caption_f1": "caption F1"}
RUNS = {"mix-prism": "align (PRISM)", "mix-prism-dapo": "then DAPO"}


def points(run_dir: Path) -> list[dict]:
    """The held-out evaluations of one run, in step order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found = [{"step": r["step"], **{m: r[m] for m in METRICS}} for r in rows if "eval/synth/acc" in r]
    if not found:
        raise SystemExit(f"error: {run_dir} has no held-out evaluation (run it with --eval-tasks synth)")
    return found


def summary(curve: list[dict], metric: str) -> dict:
    """Start, end, best and the step of the best (the earliest, on a tie) of one curve."""
    best = max(curve, key=lambda p: (p[metric], -p["step"]))
    return {"start": curve[0][metric], "end": curve[-1][metric], "best": best[metric], "best_step": best["step"]}


def collect(curves_dir: Path, seeds: list[int]) -> dict:
    data = {}
    for seed in seeds:
        for run in RUNS:
            curve = points(curves_dir / f"seed{seed}" / run)
            data.setdefault(run, {})[str(seed)] = {"points": curve,
                                                   **{METRICS[m]: summary(curve, m) for m in METRICS}}
    return data


def markdown(data: dict, eval_n: int) -> str:
    lines = ["# Held-out curves inside training (recipes/curves-tiny.sh)", "",
             f"Greedy on synth test problems 0-{eval_n - 1} (not the ablation's test slice), percent; best = the "
             "highest evaluation and its step (step 0 is the input).", "",
             "| run | seed | accuracy start | best (step) | end | caption F1 start | best (step) | end |",
             "|---|---|---|---|---|---|---|---|"]
    for run, seeds in data.items():
        for seed, d in seeds.items():
            a, c = d["accuracy"], d["caption F1"]
            lines.append(f"| {RUNS[run]} | {seed} | {100 * a['start']:.1f} | {100 * a['best']:.1f} ({a['best_step']}) "
                         f"| {100 * a['end']:.1f} | {100 * c['start']:.1f} | {100 * c['best']:.1f} ({c['best_step']}) "
                         f"| {100 * c['end']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 4))
    for ax, (metric, label) in zip(axes, METRICS.items()):
        for run, style in zip(RUNS, ("-", "--")):
            align_steps = max(p["step"] for s in data["mix-prism"].values() for p in s["points"])
            offset = 0 if run == "mix-prism" else align_steps
            for seed, d in data[run].items():
                xs = [p["step"] + offset for p in d["points"]]
                ax.plot(xs, [100 * p[metric] for p in d["points"]], style, marker="o", markersize=3,
                        color=f"C{int(seed)}", label=f"seed {seed}, {RUNS[run]}")
        ax.set_xlabel("policy step (align, then DAPO)")
        ax.set_ylabel(f"held-out {label} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curves", required=True, help="the curves directory of recipes/curves-tiny.sh")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()
    data = collect(Path(args.curves), args.seeds)
    eval_n = json.loads((Path(args.curves) / f"seed{args.seeds[0]}" / "mix-prism" / "prism.json").read_text())
    eval_n = eval_n["config"]["eval_n"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"eval_n": eval_n, "seeds": args.seeds, "runs": data}, indent=1))
    out.with_suffix(".md").write_text(markdown(data, eval_n))
    plot(data, out.with_suffix(".png"))
    print(markdown(data, eval_n))


if __name__ == "__main__":
    main()
