"""The ablation table of recipes/ablation-tiny.sh: every eval directory under --out-dir -> one row per
checkpoint kind with the mean over seeds and its 95% interval, per-family accuracy, perception measures, the
error split, paired differences (does alignment help the same seed's RL?), and the alignment game's evidence.

    python benchmarks/ablation_table.py --out-dir out/ablation-tiny --seeds "0 1 2" --eval-n 500 \
        --results benchmarks/results/ablation-tiny

Writes RESULTS.json (every number, per seed), RESULTS.md (the tables) and RESULTS.png (accuracy and
perception per row, with the intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

from stages.common.synth import generate
from stages.common.synth.caption_check import mentions, scene_items
from stages.common.protocol import parse_response
from stages.eval.synth_native import summarize

# The rows in the order the paper's table reads; labels as the README and the plot show them.
ROWS = {
    "base": "base (tiny-seeing)",
    "sft_clean": "SFT on clean demos (reference)",
    "sft": "SFT (drifted demos)",
    "sft-grpo": "SFT -> GRPO",
    "sft-dapo": "SFT -> DAPO",
    "sft-gspo": "SFT -> GSPO",
    "sft-prism": "SFT -> PRISM",
    "sft-prism-grpo": "SFT -> PRISM -> GRPO",
    "sft-prism-dapo": "SFT -> PRISM -> DAPO",
    "sft-prism-gspo": "SFT -> PRISM -> GSPO",
    "sft-prism_dense": "SFT -> PRISM (dense disc)",
    "sft-prism_textonly": "SFT -> PRISM (text-only disc)",
    "sft-prism_dense-grpo": "SFT -> PRISM (dense disc) -> GRPO",
    "sft-prism_textonly-grpo": "SFT -> PRISM (text-only disc) -> GRPO",
}
# Paired by seed: (with alignment, without) -- the question the paper asks of each RL algorithm.
PAIRS = [("sft-prism", "sft"), ("sft-prism-grpo", "sft-grpo"), ("sft-prism-dapo", "sft-dapo"),
         ("sft-prism-gspo", "sft-gspo"), ("sft-prism_dense-grpo", "sft-prism-grpo"),
         ("sft-prism_textonly-grpo", "sft-prism-grpo"), ("sft", "sft_clean")]
MEASURES = ("acc", "caption_f1", "exact_count", "green_recall", "perception_errors", "reasoning_errors", "format")
# Two-sided 95% Student-t quantiles by degrees of freedom (n seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t interval over seeds (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def row_of(ref: str) -> tuple[str, str]:
    """(row, seed) of an evaluated checkpoint ref: .../seedS/NAME, or the base model."""
    path = Path(ref)
    if path.parent.name.startswith("seed"):
        return path.name, path.parent.name[4:]
    return "base", "-"


def score_records(records: list[dict], scenes: dict[str, dict]) -> dict:
    """One evaluation's measures from its per-sample records (samples/synth.jsonl): eval's own summary (accuracy,
    format, caption F1, error split) plus exact counts, green recall and accuracy per family."""
    n = len(records)
    summary = summarize(records)
    exact = green_hit = green_all = 0
    for r in records:
        named = mentions(parse_response(r["response"]).caption or "")
        actual = scene_items(scenes[r["id"]])
        exact += sum(named.values()) == sum(actual.values())
        greens = {k: v for k, v in actual.items() if k[0] == "green"}
        green_all += sum(greens.values())
        green_hit += sum(min(v, named.get(k, 0)) for k, v in greens.items())
    by_task: dict[str, list[float]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["acc"])
    extra = summary["extra"]
    return {"n": n, "acc": summary["value"], "format": extra["format"], "caption_f1": extra["caption_f1"],
            "exact_count": exact / n, "green_recall": green_hit / max(green_all, 1),
            "perception_errors": extra["perception_errors"], "reasoning_errors": extra["reasoning_errors"],
            "acc_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}


def game_evidence(run: Path) -> dict | None:
    """What the alignment game measured: held-out discriminator accuracy after warmup, and over the game the
    discriminator's pairwise accuracy, the teacher-student score gaps and the advantage spread (first and last
    fifth of the steps)."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    game = [r for r in records if "gap/caption" in r]
    warm = [r for r in records if r.get("phase") == "warmup_done"]
    out = {k: v for k, v in (warm[-1] if warm else {}).items() if k.startswith("warmup/heldout")}
    k = max(1, len(game) // 5)
    for key in ("d/acc_caption", "d/acc_think", "gap/caption", "gap/think", "advantage/std", "acc/mean"):
        vals = [r[key] for r in game if key in r and r[key] == r[key]]
        if vals:
            out[f"first {key}"] = sum(vals[:k]) / len(vals[:k])
            out[f"last {key}"] = sum(vals[-k:]) / len(vals[-k:])
    return out


def collect(out_dir: Path, eval_n: int) -> dict:
    scenes = {s.id: s.meta["scene"] for s in generate("test", eval_n, seed=0)}
    per_seed: dict[str, dict[str, dict]] = {}
    for results in sorted(out_dir.glob("**/results.json")):
        report = json.loads(results.read_text())
        if "synth" not in report.get("tasks", {}):
            continue
        row, seed = row_of(report["checkpoint"]["ref"])
        lines = (results.parent / "samples" / "synth.jsonl").read_text().splitlines()
        scored = score_records([json.loads(x) for x in lines if x.strip()], scenes)
        if scored["n"] != eval_n:
            raise SystemExit(f"{results}: {scored['n']} problems, expected {eval_n}")
        per_seed.setdefault(row, {})[seed] = scored
    games = {}
    for metrics in sorted(out_dir.glob("seed*/sft-prism*/metrics.jsonl")):
        if "-" not in metrics.parent.name.removeprefix("sft-"):  # the align runs, not the RL after them
            games.setdefault(metrics.parent.name, {})[metrics.parent.parent.name[4:]] = game_evidence(metrics.parent)
    return {"rows": per_seed, "games": games}


def fmt(mean: float, half: float | None, scale: float = 100.0) -> str:
    return f"{scale * mean:.1f}" + (f" ± {scale * half:.1f}" if half is not None else "")


def tables(data: dict, seeds: list[str], eval_n: int) -> str:
    rows = [r for r in ROWS if r in data["rows"]]
    lines = [f"Greedy, on the same {eval_n} synth test problems; mean over seeds {' '.join(seeds)} ± the 95% "
             "t interval of that mean (the base is deterministic: one evaluation). Percent.", "",
             "| row | accuracy | caption F1 | exact count | green recall | perception err | reasoning err | format |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [fmt(*interval([v[m] for v in data["rows"][r].values()])) for m in MEASURES]
        lines.append(f"| {ROWS[r]} | " + " | ".join(cells) + " |")
    tasks = sorted({t for r in rows for v in data["rows"][r].values() for t in v["acc_by_task"]})
    lines += ["", "Accuracy per task family (mean over seeds, percent):", "",
              "| row | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for r in rows:
        vals = data["rows"][r].values()
        lines.append(f"| {ROWS[r]} | " + " | ".join(
            f"{100 * interval([v['acc_by_task'].get(t, 0.0) for v in vals])[0]:.1f}" for t in tasks) + " |")
    lines += ["", "Paired by seed (row minus reference, same seed), mean ± 95% t interval, points:", "",
              "| comparison | accuracy | caption F1 | exact count | green recall |", "|---|---|---|---|---|"]
    for a, b in PAIRS:
        if a in data["rows"] and b in data["rows"]:
            common = [s for s in data["rows"][a] if s in data["rows"][b]]
            cells = [fmt(*interval([data["rows"][a][s][m] - data["rows"][b][s][m] for s in common]))
                     for m in ("acc", "caption_f1", "exact_count", "green_recall")]
            lines.append(f"| {ROWS[a]} vs {ROWS[b]} | " + " | ".join(cells) + " |")
    if data["games"]:
        keys = ["warmup/heldout_acc_caption", "warmup/heldout_acc_think", "first d/acc_caption", "last d/acc_caption",
                "first d/acc_think", "last d/acc_think", "first gap/caption", "last gap/caption",
                "first gap/think", "last gap/think", "last advantage/std"]
        lines += ["", "The alignment game (mean over seeds): held-out pairwise accuracy of the warmed-up discriminator,"
                  " its pairwise accuracy and the teacher-minus-student score gaps over the first and last fifth of"
                  " the game, and the spread of the policy's advantages:", "",
                  "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for run, by_seed in sorted(data["games"].items()):
            vals = [g for g in by_seed.values() if g]
            lines.append(f"| {run} | " + " | ".join(
                f"{sum(g[k] for g in vals if k in g) / max(1, sum(k in g for g in vals)):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def plot(data: dict, png: Path, eval_n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r in data["rows"]]
    fig, axes = plt.subplots(1, 4, figsize=(20, 6), sharey=True)
    for ax, measure, title in zip(axes, ("acc", "caption_f1", "green_recall", "exact_count"),
                                  ("answer accuracy", "caption F1 (perception)", "green recall (green named green)",
                                   "exact object count")):
        stats = [interval([v[measure] for v in data["rows"][r].values()]) for r in rows]
        colours = ["#999999" if r == "base" else "#bbbbbb" if r == "sft_clean" else "#4c72b0" if r.startswith("sft-prism")
                   else "#dd8452" for r in rows]
        ax.barh(range(len(rows)), [100 * m for m, _ in stats], color=colours,
                xerr=[100 * (h or 0) for _, h in stats], capsize=3)
        for i, (m, _) in enumerate(stats):
            ax.text(1, i, f"{100 * m:.1f}", va="center", fontsize=8, color="white")
        ax.set_title(title)
        ax.set_xlim(0, 100)
    axes[0].set_yticks(range(len(rows)), [ROWS[r] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"PRISM in miniature: tiny-seeing on synth, {eval_n} test problems, mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/ablation_table.py")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--results", required=True, help="path prefix of the .json/.md/.png written")
    parser.add_argument("--settings", default="")
    parser.add_argument("--timings", default="")
    parser.add_argument("--wall", type=int, default=0)
    parser.add_argument("--load-start", default="")
    args = parser.parse_args(argv)
    seeds = args.seeds.split()
    data = collect(Path(args.out_dir), args.eval_n)
    missing = [f"{r}/seed{s}" for r in ROWS if r != "base" and r in data["rows"] for s in seeds
               if s not in data["rows"][r]]
    if missing:
        raise SystemExit(f"evaluations missing: {', '.join(missing)}")
    machine = f"{platform.system()} {platform.machine()}, {__import__('os').cpu_count()} cores"
    prefix = Path(args.results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps({"seeds": seeds, "eval_n": args.eval_n, "settings": args.settings,
                                                  "machine": machine, "wall_s": args.wall, **data}, indent=1) + "\n")
    md = ["# PRISM in miniature (recipes/ablation-tiny.sh)", "", tables(data, seeds, args.eval_n), "",
          f"Settings: {args.settings}.", "",
          f"Machine: {machine}; load average at start {args.load_start}. Wall time {args.wall} s "
          f"({args.wall // 60} min).", "", f"Stage wall times (s): {args.timings}", ""]
    Path(f"{prefix}.md").write_text("\n".join(md))
    plot(data, Path(f"{prefix}.png"), args.eval_n)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
