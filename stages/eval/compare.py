"""The paper-style table: rows = checkpoints, columns = tasks + average, accuracies in percent."""

from __future__ import annotations

import json
from pathlib import Path

from prism_cli import console
from prism_cli.errors import PrismError
from stages.eval.tasks import PAPER_TASKS, split_names

RESULTS = "results.json"


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
        avg = average(results, columns)
        cells.append(None if avg is None else round(100 * avg, 1))
        rows.append(cells)
    return rows


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


def show(directories: list[str], markdown_path: str = "") -> str:
    """Print the comparison of eval directories (and write it as Markdown); returns the Markdown text."""
    directories = split_names(directories)
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
    if markdown_path:
        try:
            Path(markdown_path).expanduser().write_text(text, encoding="utf-8")
        except OSError as e:
            raise PrismError(f"cannot write --markdown {markdown_path}: {e.strerror}") from None
    return text
