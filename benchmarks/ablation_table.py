"""The ablation table of recipes/ablation-tiny.sh (design: docs/miniature.md): every eval directory under
--out-dir -> one row per checkpoint kind with the mean over seeds and its 95% t interval, per-family accuracy,
perception measures, the error split; the comparisons fixed in the design, each as a paired bootstrap over seeds
and problems with per-problem win/loss counts; and the alignment game's evidence.

    python benchmarks/ablation_table.py --out-dir out/ablation-tiny --seeds "0 1 2" --eval-n 2000 \
        --test-first 1500 --results benchmarks/results/ablation-tiny

Writes RESULTS.json (every number per seed, each row's per-problem correctness, the comparisons), RESULTS.md
(the tables) and RESULTS.png (accuracy and perception per row, with the intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

from stages.common.protocol import parse_response
from stages.common.world.synth import generate
from stages.common.world.synth.caption_check import mentions, scene_items
from stages.eval.compare import paired_bootstrap, resolved, wins_losses
from stages.common.evaluation.synth import summarize

# The rows in the order the table reads; labels as the README and the plot show them (docs/miniature.md).
ROWS = {
    "base": "base (tiny-seeing)",
    "sft": "SFT, drifted public demos",
    "sft-teacher": "SFT -> plain SFT on teacher demos (control)",
    "sft-prism": "SFT -> PRISM",
    "sft-prism-dapo": "SFT -> PRISM -> DAPO",
    "sft-dapo-2x": "SFT -> DAPO, 2x steps (control)",
    "mix": "SFT on the mix (public + teacher demos)",
    "mix-teacher": "mix -> plain SFT on teacher demos (control)",
    "mix-prism": "mix -> PRISM",
    "mix-dapo": "mix -> DAPO",
    "mix-prism-dapo": "mix -> PRISM -> DAPO",
    "mix-dapo-2x": "mix -> DAPO, 2x steps (control)",
    "mix-grpo": "mix -> GRPO",
    "mix-prism-grpo": "mix -> PRISM -> GRPO",
    "mix-gspo": "mix -> GSPO",
    "mix-prism-gspo": "mix -> PRISM -> GSPO",
}
# The comparisons fixed in advance (docs/miniature.md): (id, row, reference, primary). Row minus reference,
# paired by seed and problem.
COMPARISONS = [("P1", "mix-prism", "mix-teacher", True), ("P2", "mix-prism-dapo", "mix-dapo-2x", True),
               ("P3", "mix-prism", "mix", False), ("P4", "mix-prism-dapo", "mix-dapo", False),
               ("P5", "sft-prism", "sft-teacher", False), ("P6", "sft-prism-dapo", "sft-dapo-2x", False),
               ("P7", "mix", "sft", False), ("P8", "mix-prism-grpo", "mix-grpo", False),
               ("P8", "mix-prism-gspo", "mix-gspo", False)]
PAIRED_MEASURES = ("acc", "caption_f1", "green_recall")
N_BOOT, BOOT_SEED = 10_000, 0
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


def per_problem(records: list[dict], scenes: dict[str, dict]) -> dict[str, dict]:
    """{problem id: {acc, caption_f1, green_hits, greens}}: what the paired bootstrap resamples."""
    out = {}
    for r in records:
        named = mentions(parse_response(r["response"]).caption or "")
        greens = {k: v for k, v in scene_items(scenes[r["id"]]).items() if k[0] == "green"}
        out[r["id"]] = {"acc": float(r["acc"]), "caption_f1": float(r.get("caption_f1") or 0.0),
                        "green_hits": sum(min(v, named.get(k, 0)) for k, v in greens.items()),
                        "greens": sum(greens.values())}
    return out


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
    out = {k: v for k, v in (warm[-1] if warm else {}).items() if k.startswith(("warmup/heldout", "warmup/held_out"))}
    k = max(1, len(game) // 5)
    for key in ("d/acc_caption", "d/acc_think", "gap/caption", "gap/think", "advantage/std", "acc/mean"):
        vals = [r[key] for r in game if key in r and r[key] == r[key]]
        if vals:
            out[f"first {key}"] = sum(vals[:k]) / len(vals[:k])
            out[f"last {key}"] = sum(vals[-k:]) / len(vals[-k:])
    return out if game else None  # an RL run's metrics: not a game


def collect(out_dir: Path, eval_n: int, test_first: int = 0) -> dict:
    """Every synth evaluation under out_dir scored (rows[row][seed]), each row's per-problem scores
    (problems[row][seed][id], for the paired comparisons), and every align run's game evidence."""
    scenes = {s.id: s.meta["scene"] for s in generate("test", eval_n, seed=0, first=test_first)}
    per_seed: dict[str, dict[str, dict]] = {}
    problems: dict[str, dict[str, dict]] = {}
    for results in sorted(out_dir.glob("**/results.json")):
        report = json.loads(results.read_text())
        if "synth" not in report.get("tasks", {}):
            continue
        row, seed = row_of(report["checkpoint"]["ref"])
        lines = (results.parent / "samples" / "synth.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines if x.strip()]
        if len(records) != eval_n or any(r["id"] not in scenes for r in records):
            raise SystemExit(f"{results}: {len(records)} problems, expected {eval_n} from test problem {test_first}")
        per_seed.setdefault(row, {})[seed] = scored = score_records(records, scenes)
        problems.setdefault(row, {})[seed] = per_problem(records, scenes)
        scored["acc_bits"] = "".join("1" if problems[row][seed][i]["acc"] >= 1.0 else "0" for i in scenes)
    games = {}
    for metrics in sorted(out_dir.glob("seed*/*/metrics.jsonl")):
        evidence = game_evidence(metrics.parent)
        if evidence is not None:  # align runs only
            games.setdefault(metrics.parent.name, {})[metrics.parent.parent.name[4:]] = evidence
    return {"rows": per_seed, "games": games, "problems": problems}


def compare_rows(problems: dict, row: str, ref: str, seeds: list[str], n_boot: int = N_BOOT,
                 seed: int = BOOT_SEED) -> dict:
    """Row minus reference on every paired measure: the paired bootstrap over seeds x problems (the base,
    evaluated once, pairs with every seed), and per-seed win/loss counts on accuracy."""
    def runs(name: str) -> list[dict]:
        by_seed = problems[name]
        return [by_seed["-"]] * len(seeds) if "-" in by_seed else [by_seed[s] for s in seeds]

    ids = sorted(runs(row)[0])  # the same problems in the same order for both rows and every seed

    def cells(name: str, key: str) -> list[list[float]]:
        return [[run[i][key] for i in ids] for run in runs(name)]

    out = {}
    for measure in PAIRED_MEASURES:
        if measure == "green_recall":  # a ratio of sums: per-problem recall weighted by its greens
            greens = cells(row, "greens")
            a = [[h / g if g else 0.0 for h, g in zip(hs, gs)] for hs, gs in zip(cells(row, "green_hits"), greens)]
            b = [[h / g if g else 0.0 for h, g in zip(hs, gs)] for hs, gs in zip(cells(ref, "green_hits"), greens)]
            out[measure] = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, weights=greens)
        else:
            out[measure] = paired_bootstrap(cells(row, measure), cells(ref, measure), n_boot=n_boot, seed=seed)
    a, b = cells(row, "acc"), cells(ref, "acc")
    out["wins_losses"] = {s: list(wins_losses(x, y)) for s, x, y in zip(seeds, a, b)}
    return out


def comparisons(data: dict, seeds: list[str]) -> list[dict]:
    """The design's comparisons whose rows were run, in its order."""
    out = []
    for cid, row, ref, primary in COMPARISONS:
        if row in data["problems"] and ref in data["problems"]:
            out.append({"id": cid, "row": row, "ref": ref, "primary": primary,
                        **compare_rows(data["problems"], row, ref, seeds)})
    return out


def fmt(mean: float, half: float | None, scale: float = 100.0) -> str:
    return f"{scale * mean:.1f}" + (f" ± {scale * half:.1f}" if half is not None else "")


def tables(data: dict, seeds: list[str], eval_n: int, test_first: int = 0) -> str:
    rows = [r for r in ROWS if r in data["rows"]]
    lines = [f"Greedy, on the same {eval_n} synth test problems ({test_first} to {test_first + eval_n - 1}); mean over seeds {' '.join(seeds)} ± the 95% "
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
    lines += ["", f"The comparisons fixed in advance (docs/miniature.md; P1 and P2 are primary): row minus reference, "
              f"paired by seed and problem, points, with the 95% interval of a bootstrap over seeds and problems "
              f"({N_BOOT} replicates, seed {BOOT_SEED}); ** the interval excludes 0. Wins / losses: problems the row "
              "gets right and the reference wrong / the reverse, per seed.", "",
              "| | comparison | accuracy | caption F1 | green recall | wins / losses (accuracy) |",
              "|---|---|---|---|---|---|"]
    for c in data.get("comparisons", []):
        cells = []
        for m in PAIRED_MEASURES:
            b = c[m]
            text = f"{100 * b['diff']:+.1f} [{100 * b['low']:+.1f}, {100 * b['high']:+.1f}]"
            cells.append(f"**{text}**" if resolved(b) else text)
        wl = ", ".join(f"{w}/{lo}" for w, lo in c["wins_losses"].values())
        total = [sum(x[i] for x in c["wins_losses"].values()) for i in (0, 1)]
        lines.append(f"| {c['id']}{' (primary)' if c['primary'] else ''} | {ROWS[c['row']]} vs {ROWS[c['ref']]} | "
                     + " | ".join(cells) + f" | {wl} (total {total[0]}/{total[1]}) |")
    if data["games"]:
        keys = ["warmup/held_out", "warmup/heldout_acc_caption_before", "warmup/heldout_acc_caption",
                "warmup/heldout_acc_think_before", "warmup/heldout_acc_think", "first d/acc_caption", "last d/acc_caption",
                "first d/acc_think", "last d/acc_think", "first gap/caption", "last gap/caption",
                "first gap/think", "last gap/think", "last advantage/std"]
        lines += ["", "The alignment game (mean over seeds): held-out pairs and the discriminator's pairwise accuracy on"
                  " them before and after warmup,"
                  " its pairwise accuracy and the teacher-minus-student score gaps over the first and last fifth of"
                  " the game, and the spread of the policy's advantages:", "",
                  "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for run, by_seed in sorted(data["games"].items()):
            vals = [g for g in by_seed.values() if g]
            lines.append(f"| {run} | " + " | ".join(
                f"{sum(g[k] for g in vals if k in g) / max(1, sum(k in g for g in vals)):{'.0f' if k == 'warmup/held_out' else '.3f'}}"
                for k in keys) + " |")
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
        colours = ["#999999" if r == "base" else "#55a868" if r.endswith(("-teacher", "-2x")) else "#4c72b0"
                   if "prism" in r else "#dd8452" for r in rows]
        ax.barh(range(len(rows)), [100 * m for m, _ in stats], color=colours,
                xerr=[100 * (h or 0) for _, h in stats], capsize=3)
        for i, (m, _) in enumerate(stats):
            ax.text(1, i, f"{100 * m:.1f}", va="center", fontsize=8, color="white")
        ax.set_title(title)
        ax.set_xlim(0, 100)
    axes[0].set_yticks(range(len(rows)), [ROWS[r] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"PRISM in miniature: tiny-seeing on synth, {eval_n} test problems, mean and 95% interval over seeds"
                 " (green: controls)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/ablation_table.py")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--eval-n", type=int, default=2000)
    parser.add_argument("--test-first", type=int, default=1500, help="the index of the first test problem")
    parser.add_argument("--results", required=True, help="path prefix of the .json/.md/.png written")
    parser.add_argument("--settings", default="")
    parser.add_argument("--timings", default="")
    parser.add_argument("--wall", type=int, default=0)
    parser.add_argument("--load-start", default="")
    args = parser.parse_args(argv)
    seeds = args.seeds.split()
    data = collect(Path(args.out_dir), args.eval_n, args.test_first)
    missing = [f"{r}/seed{s}" for r in ROWS if r != "base" and r in data["rows"] for s in seeds
               if s not in data["rows"][r]]
    if missing:
        raise SystemExit(f"evaluations missing: {', '.join(missing)}")
    data["comparisons"] = comparisons(data, seeds)
    problems = data.pop("problems")  # in the JSON as each row's acc_bits; the rest is recomputed from samples
    machine = f"{platform.system()} {platform.machine()}, {__import__('os').cpu_count()} cores"
    prefix = Path(args.results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps({"seeds": seeds, "eval_n": args.eval_n, "test_first": args.test_first,
                                                  "bootstrap": {"replicates": N_BOOT, "seed": BOOT_SEED},
                                                  "settings": args.settings, "machine": machine, "wall_s": args.wall,
                                                  **data}, indent=1) + "\n")
    md = ["# PRISM in miniature (recipes/ablation-tiny.sh; design: docs/miniature.md)", "",
          tables(data, seeds, args.eval_n, args.test_first), "",
          f"Settings: {args.settings}.", "",
          f"Machine: {machine}; load average at start {args.load_start}. Wall time {args.wall} s "
          f"({args.wall // 60} min).", "", f"Stage wall times (s): {args.timings}", ""]
    Path(f"{prefix}.md").write_text("\n".join(md))
    data["problems"] = problems
    plot(data, Path(f"{prefix}.png"), args.eval_n)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
