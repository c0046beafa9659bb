"""The paper-style table: rows = checkpoints, columns = tasks + average, accuracies in percent; then every row
paired with the first, problem by problem: the mean difference with a bootstrap interval and win/loss counts.

A row may be several evaluations of one recipe run with different seeds, joined with "+" (`--compare
"s0/eval-sft+s1/eval-sft,s0/eval-prism+s1/eval-prism"`): rows are paired seed by seed (in the order given)
and the interval resamples seeds and problems (docs/miniature.md, "The statistics")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.common.contract import console
from stages.common.contract.errors import PrismError
from stages.eval.tasks import PAPER_TASKS, split_names

RESULTS = "results.json"
SAMPLES = "samples"


def read_results(directory: str | Path) -> dict:
    """results.json of an eval directory, refusing anything else with a line naming the directory."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise PrismError(f"--compare {directory} is not a directory")
    try:
        data = json.loads((path / RESULTS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrismError(f"--compare {directory} has no {RESULTS}", hint="give directories written by prism eval") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PrismError(f"{path / RESULTS} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise PrismError(f"{path / RESULTS} is not a prism eval results file (no 'tasks')")
    return data


def row_label(results: dict, directory: str | Path) -> str:
    return (results.get("checkpoint") or {}).get("ref") or Path(directory).name


def short_labels(refs: list[str]) -> list[str]:
    """The shortest trailing part of each path that still tells the rows apart: /home/me/runs/a/rl and
    /home/me/runs/b/rl become a/rl and b/rl; a lone /scratch/x/out/sft becomes sft."""
    parts = [Path(r).parts or (r,) for r in refs]
    depth = [1] * len(refs)
    while True:
        labels = [str(Path(*p[-d:])) for p, d in zip(parts, depth)]
        clash = [i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def task_columns(all_results: list[dict]) -> list[str]:
    """The paper's tasks first (in its order), then synth, then anything else in first-seen order."""
    seen: list[str] = []
    for r in all_results:
        for name in r["tasks"]:
            if name not in seen:
                seen.append(name)
    ordered = [t for t in PAPER_TASKS if t in seen]
    ordered += [t for t in ("synth",) if t in seen]
    return ordered + [t for t in seen if t not in ordered]


def average(results: dict, columns: list[str]) -> float | None:
    """Mean over the columns; None when the checkpoint lacks one of them (an average of different sets
    of tasks would not compare)."""
    values = [results["tasks"].get(c, {}).get("value") for c in columns]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def table_rows(labels: list[str], all_results: list[dict], columns: list[str]) -> list[list]:
    rows = []
    for label, results in zip(labels, all_results):
        cells = [label]
        for c in columns:
            task = results["tasks"].get(c, {})
            value = task.get("value")
            if value is None:
                cells.append(None)
                continue
            stderr = f" ± {100 * task['stderr']:.1f}" if isinstance(task.get("stderr"), (int, float)) else ""
            n = f" (n={task['n']})" if task.get("n") is not None else ""
            cells.append(f"{100 * value:.1f}{stderr}{n}")
        cells.append(average_cell(results, columns))
        rows.append(cells)
    return rows


def average_cell(results: dict, columns: list[str]):
    """The avg column: the paper's average over its benchmarks with its standard error and n, as the paper's
    table reports it, when this evaluation's paper benchmarks are the table's; else the plain mean of the
    columns (None when a column is missing)."""
    paper = results.get("paper_average")
    if paper and paper.get("benchmarks") == [c for c in columns if c in PAPER_TASKS] and len(paper["benchmarks"]) == len(columns):
        return f"{100 * paper['value']:.1f} ± {100 * paper['stderr']:.1f} (n={paper['n']})"
    avg = average(results, columns)
    return None if avg is None else round(100 * avg, 1)


PERCEPTION_HEADER = ["checkpoint", "caption F1", "perception errors", "reasoning errors", "format"]


def synth_perception_rows(labels: list[str], all_results: list[dict]) -> list[list]:
    """Caption F1 and the error split of each checkpoint's synth evaluation ("-" where it has none)."""
    rows = []
    for label, results in zip(labels, all_results):
        extra = results["tasks"].get("synth", {}).get("extra", {})
        cells = [round(100 * extra[k], 1) if isinstance(extra.get(k), (int, float)) else "-"
                 for k in ("caption_f1", "perception_errors", "reasoning_errors", "format")]
        rows.append([label, *cells])
    return rows if any(c != "-" for r in rows for c in r[1:]) else []


def markdown(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- paired differences

def paired_bootstrap(a, b, n_boot: int = 10_000, seed: int = 0, weights=None, level: float = 0.95) -> dict:
    """Mean of a - b over (seed, problem) cells, with a percentile bootstrap interval.

    a and b are [seeds][problems] scores (or one list of problems: one seed), the same problems in the same
    order for every seed. Seeds and problems are crossed, so one replicate draws the seeds with replacement
    and, independently, the problems with replacement (one draw shared by every drawn seed), and takes the
    weighted mean difference over the drawn cells. weights ([problems] or [seeds][problems], default 1) make
    it a ratio of sums: per-problem recalls weighted by their denominators give the pooled recall."""
    da, db = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if da.ndim == 1:
        da, db = da[None], db[None]
    if da.shape != db.shape or da.ndim != 2 or da.size == 0:
        raise PrismError(f"paired scores must be [seeds][problems] of one shape (got {da.shape} and {db.shape})")
    w = np.broadcast_to(np.asarray(1.0 if weights is None else weights, dtype=float), da.shape)
    if w.sum() <= 0:
        raise PrismError("paired bootstrap: the weights sum to zero (no problem counts)")
    if not 0 < level < 1 or n_boot < 1:
        raise PrismError(f"paired bootstrap: level must be in (0, 1) and n_boot >= 1 (got {level}, {n_boot})")
    n_seeds, n_problems = da.shape
    wd = w * (da - db)
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_boot, 500):  # chunks keep the [replicates][problems] counts small
        k = min(500, n_boot - start)
        seed_counts = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=k)
        problem_counts = rng.multinomial(n_problems, [1 / n_problems] * n_problems, size=k)
        num = ((seed_counts @ wd) * problem_counts).sum(axis=1)
        den = ((seed_counts @ w) * problem_counts).sum(axis=1)
        stats.append(num[den > 0] / den[den > 0])  # a replicate that drew only zero-weight problems says nothing
    stats = np.concatenate(stats)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(wd.sum() / w.sum()), "low": float(low), "high": float(high), "level": level,
            "seeds": n_seeds, "problems": n_problems, "n_boot": int(stats.size)}


def wins_losses(a, b) -> tuple[int, int]:
    """(problems where a scores above b, problems where b scores above a), summed over seeds if nested."""
    da, db = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if da.shape != db.shape:
        raise PrismError(f"win/loss counts need the same problems (got {da.shape} and {db.shape})")
    return int((da > db).sum()), int((da < db).sum())


def resolved(interval: dict) -> bool:
    """Whether the interval excludes zero."""
    return interval["low"] > 0 or interval["high"] < 0


def per_problem_scores(directory: str | Path, task: str, metric: str) -> dict[str, float] | None:
    """{problem id: score} from an eval directory's samples/<task>.jsonl (None when it has none): synth records
    carry id and acc; lmms-eval records carry doc_id and the task's metric."""
    path = Path(directory).expanduser() / SAMPLES / f"{task}.jsonl"
    if not path.is_file():
        return None
    scores = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PrismError(f"{path} line {n} is not valid JSON") from None
        key = row.get("id", row.get("doc_id"))
        value = row.get(metric, row.get("acc"))
        if key is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PrismError(f"{path} line {n}: no problem id or no numeric {metric!r} score")
        scores[str(key)] = float(value)
    return scores


def paired_cells(ref: list[dict[str, float]], row: list[dict[str, float]]) -> tuple[list[list], list[list]]:
    """[seeds][problems] score matrices of two rows on the problems every seed of both evaluated (in the
    reference's first seed's order)."""
    common = [k for k in ref[0] if all(k in s for s in ref + row)]
    return [[s[k] for k in common] for s in ref], [[s[k] for k in common] for s in row]


PAIRED_HEADER = ["row minus reference", "task", "seeds x problems", "difference", "95% interval", "wins / losses"]


def paired_table(groups: list[list[str]], labels: list[str], all_results: list[dict], columns: list[str],
                 n_boot: int = 10_000, seed: int = 0) -> tuple[list[list], list[str]]:
    """Rows of the paired table (every group against the first, per task both evaluated per problem), and
    notes saying what could not be paired and why."""
    rows, notes = [], []
    by_dir = iter(all_results)
    results = [[next(by_dir) for _ in g] for g in groups]
    ref_dirs, ref_results = groups[0], results[0]
    for g, label, res in zip(groups[1:], labels[1:], results[1:]):
        if len(g) != len(ref_dirs):
            raise PrismError(f"--compare: {label} gives {len(g)} seed(s) and the reference {labels[0]} "
                             f"{len(ref_dirs)}; rows are paired seed by seed",
                             hint='join one row\'s seeds with "+" in the same order for every row')
        for task in columns:
            if not all(task in r["tasks"] for r in res + ref_results):
                continue
            metric = ref_results[0]["tasks"][task].get("metric") or "acc"
            ref = [per_problem_scores(d, task, metric) for d in ref_dirs]
            mine = [per_problem_scores(d, task, metric) for d in g]
            if any(s is None for s in ref + mine):
                notes.append(f"{task}: {label} vs {labels[0]} not paired (an evaluation has no "
                             f"{SAMPLES}/{task}.jsonl)")
                continue
            a, b = paired_cells(ref, mine)
            if not a[0]:
                raise PrismError(f"--compare: {label} and {labels[0]} share no {task} problems",
                                 hint="pair evaluations of the same problems (the same --synth spec and seed)")
            boot = paired_bootstrap(b, a, n_boot=n_boot, seed=seed)
            wins, losses = wins_losses(b, a)
            star = "*" if resolved(boot) else ""
            rows.append([f"{label} - {labels[0]}", task, f"{len(a)} x {len(a[0])}",
                         f"{100 * boot['diff']:+.1f}{star}", f"[{100 * boot['low']:+.1f}, {100 * boot['high']:+.1f}]",
                         f"{wins} / {losses}"])
    return rows, notes


def show(directories: list[str], markdown_path: str = "", n_boot: int = 10_000, seed: int = 0) -> str:
    """Print the comparison of eval directories (and write it as Markdown); returns the Markdown text.
    A directory list joined with "+" is one row evaluated with several seeds."""
    groups = [name.split("+") for name in split_names(directories)]
    directories = [d for g in groups for d in g]
    all_results = [read_results(d) for d in directories]
    labels = short_labels([row_label(r, d) for r, d in zip(all_results, directories)])
    columns = task_columns(all_results)
    header = ["checkpoint", *columns, "avg"]
    rows = table_rows(labels, all_results, columns)
    console.print_table("accuracy (%)", header, [[("-" if v is None else v) for v in r] for r in rows])
    text = markdown(header, rows)
    perception = synth_perception_rows(labels, all_results)
    if perception:  # synth checks each caption against its scene: show what drift does to perception
        console.print_table("synth perception (%)", PERCEPTION_HEADER, perception)
        text += "\n" + markdown(PERCEPTION_HEADER, perception)
    if len(groups) > 1:
        at = 0
        group_labels = []
        for g in groups:
            group_labels.append(labels[at] + (f" ({len(g)} seeds)" if len(g) > 1 else ""))
            at += len(g)
        paired, notes = paired_table(groups, group_labels, all_results, columns, n_boot, seed)
        title = (f"paired with {group_labels[0]}, problem by problem (points; {n_boot} bootstrap replicates "
                 f"over seeds and problems, seed {seed}; * the interval excludes 0)")
        if paired:
            console.print_table(title, PAIRED_HEADER, paired)
            text += "\n" + title + ":\n\n" + markdown(PAIRED_HEADER, paired)
        for note in notes:
            console.info(note)
    if markdown_path:
        try:
            Path(markdown_path).expanduser().write_text(text, encoding="utf-8")
        except OSError as e:
            raise PrismError(f"cannot write --markdown {markdown_path}: {e.strerror}") from None
    return text
