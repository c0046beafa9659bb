"""PNG plots a person would rather look at than metrics.jsonl: a grid of metric panels per training
stage, and a bar chart of eval results with their standard errors. Panels with no data are left out.

A plot is a convenience, never a reason to lose a run: without matplotlib (the lent GPU image may lack it)
each plot is skipped with one warning and the stage goes on to write its checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from stages.common.contract import console
from stages.common.contract.console import is_main_process


def _pyplot():
    """pyplot on the Agg backend, or None (and one warning) where matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        console.warn(f"no plot drawn: matplotlib is not importable ({e}); the metrics stay in metrics.jsonl")
        return None
    return plt


def _save(plt, fig, path: Path) -> Path | None:
    """Write the figure on the main process only, atomically. Under several processes every rank reaches
    the stage's plotting line; a rank that rewrote the PNG while the main one hashed the run directory
    left a checkpoint whose manifest no longer matched its file (seen in CI under torchrun)."""
    try:
        if not is_main_process():
            return None
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
        return path
    finally:
        plt.close(fig)


def panel_data(records: list[dict], panels: dict[str, dict[str, str]], xkey: str = "step") -> dict:
    """{panel: {label: [(x, y)]}} for the panels and series that have numbers in the records."""
    drawn = {}
    for name, series in panels.items():
        lines = {}
        for key, label in series.items():
            pts = [(r[xkey], r[key]) for r in records
                   if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and xkey in r]
            if pts:
                lines[label] = pts
        if lines:
            drawn[name] = lines
    return drawn


def plot_curves(records: list[dict], series: dict[str, str], path: Path, title: str,
                xkey: str = "step") -> Path | None:
    """One panel of metric curves: series maps metric key -> label. Returns None when no key has data."""
    lines = panel_data(records, {title: series}, xkey).get(title)
    if not lines:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in lines.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label)
    ax.set_title(title)
    ax.set_xlabel(xkey)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_panels(records: list[dict], panels: dict[str, dict[str, str]], path: Path, title: str,
                zero_line: tuple[str, ...] = (), xkey: str = "step") -> Path | None:
    """One subplot per panel title, each with its series {metric key: label}; panels named in
    zero_line get a dashed y=0 line (a gap crossing zero is the point of the align plot).
    Returns the path, or None when no panel had data."""
    drawn = panel_data(records, panels, xkey)
    if not drawn:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    cols = min(len(drawn), 3)
    rows = (len(drawn) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, drawn.items()):
        for label, pts in lines.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label)
        if name in zero_line:
            ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xkey)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_eval(results: dict[str, dict], path: Path, title: str) -> Path | None:
    """Accuracy per task in percent with a ±1 stderr bar and n under each task name."""
    names = [n for n, r in results.items() if isinstance(r.get("value"), (int, float))]
    if not names:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    values = [100 * results[n]["value"] for n in names]
    errors = [100 * (results[n].get("stderr") or 0.0) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), [f"{n}\nn={results[n].get('n', '?')}" for n in names])
    for i, v in enumerate(values):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)
