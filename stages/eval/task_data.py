"""`--task-data NAME=DIR`: evaluate a benchmark from a local copy of its dataset (offline clusters).

A copy is one of:
  - a `datasets.save_to_disk` folder of a DatasetDict holding the task's split ("saved");
  - a hub snapshot (`huggingface-cli download --repo-type dataset ID --local-dir DIR`): the README's
    `configs:` say which files make which split ("snapshot");
  - a folder of parquet files, a file per split named `<split>-*.parquet` / `<split>.parquet` or kept in a
    `<split>/` folder ("parquet").
A task that reads one config of a multi-config dataset (MMMU-Pro's "vision") also finds its copy in
DIR/<config>/ when that folder exists.

The copy is opened here, before any model loads, and checked against what the task's code reads (split,
columns, and how each column is stored: an image column must decode to a picture, an option list must be a
list). What lmms-eval then receives is a task-config override pointing at the same files, so lmms-eval
loads, prompts and scores exactly as it would from the hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stages.common.contract.errors import PrismError, UsageError
from stages.eval.tasks import ALIASES, BENCHMARKS, DataSpec, TaskPlan

# How a column is stored, as `datasets` features say it.
KINDS = {
    "image": "an image (datasets.Image)",
    "text": "text",
    "list": "a list",
    "scalar": "a single value",
    "any": "present",
}

# Every task of the benchmarks, the prism_* overrides and the official tasks the paper ran (--judge), with the
# columns its own code reads: each Benchmark row of stages.eval.tasks says it for its own tasks.
SPECS: dict[str, DataSpec] = {task: spec for bench in BENCHMARKS.values() for task, spec in bench.data.items()}


@dataclass
class LocalCopy:
    """A checked local copy of one task's dataset and the lmms-eval config override that reads it."""

    task: str
    layout: str        # "saved" | "snapshot" | "parquet"
    rows: int
    override: dict     # dataset_path / dataset_name / dataset_kwargs for lmms-eval's task config


# ------------------------------------------------------------------------------------------- options

def parse_task_data(values: list[str]) -> dict[str, Path]:
    """`--task-data NAME=DIR` (repeatable, or comma-separated) -> {NAME: DIR}; NAME as the user wrote it."""
    parsed: dict[str, Path] = {}
    for item in values:
        for entry in str(item).split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, directory = entry.partition("=")
            if not sep or not name.strip() or not directory.strip():
                raise UsageError(f"--task-data {entry!r} is not NAME=DIR",
                                 hint="e.g. --task-data mathvista=/data/MathVista (NAME: a --tasks alias or an "
                                      "lmms-eval task name)")
            name = name.strip()
            if name in parsed:
                raise UsageError(f"--task-data names {name!r} twice")
            parsed[name] = Path(directory.strip()).expanduser()
    return parsed


def tasks_for(name: str, plans: list[TaskPlan]) -> list[str]:
    """The lmms-eval tasks a --task-data NAME stands for among the planned ones (an alias covers all of its
    tasks: mmmu_pro is its standard and vision subsets)."""
    alias = ALIASES.get(name.lower(), name.lower())
    for plan in plans:
        if plan.name in (alias, name) and plan.backend == "lmms":
            return list(plan.lmms_tasks)
        if name in plan.lmms_tasks:
            return [name]
    planned = ", ".join(p.name for p in plans if p.backend == "lmms") or "none"
    raise UsageError(f"--task-data {name}: no such task among --tasks (lmms-eval tasks planned: {planned})",
                     hint="name a task given to --tasks, e.g. --tasks mathvista --task-data mathvista=DIR")


def resolve(values: list[str], plans: list[TaskPlan], task_manager=None) -> dict[str, LocalCopy]:
    """Every --task-data entry checked against its task(s): {lmms task name: LocalCopy}. Raises one line
    naming the task, what it expects and what the copy holds."""
    copies: dict[str, LocalCopy] = {}
    for name, directory in parse_task_data(values).items():
        if not directory.is_dir():
            raise UsageError(f"--task-data {name}={directory}: no such directory")
        for task in tasks_for(name, plans):
            if task == "prism_synth":
                raise UsageError("--task-data synth: synth is generated, not read (use --synth)")
            copies[task] = open_copy(task, directory, spec_for(task, task_manager))
    return copies


def spec_for(task: str, task_manager=None) -> DataSpec:
    """The known spec of one of the seven, or for any other lmms-eval task its dataset and split from its
    YAML (columns unchecked)."""
    if task in SPECS:
        return SPECS[task]
    from stages.eval.lmms_runner import PACKAGE_TASK_DIR, make_task_manager

    manager = task_manager or make_task_manager([PACKAGE_TASK_DIR])
    entry = manager.task_index.get(task) or {}
    if entry.get("type") != "task" or not isinstance(entry.get("yaml_path"), str):  # unknown, a group, a tag
        raise UsageError(f"--task-data {task}: lmms-eval has no single task of that name",
                         hint="name one task (`lmms-eval --tasks list` lists them)")
    config = task_yaml(entry["yaml_path"])
    return DataSpec(str(config.get("dataset_path", "")), config.get("dataset_name"),
                    str(config.get("test_split") or config.get("validation_split") or "test"))


def task_yaml(path) -> dict:
    """A task YAML with its includes, `!function` left unresolved (resolving imports the task's code)."""
    from lmms_eval.utils import load_yaml_config

    return load_yaml_config(yaml_path=str(path), mode="simple")


# ------------------------------------------------------------------------------------------- layouts

def open_copy(task: str, directory: Path, spec: DataSpec) -> LocalCopy:
    """Find the layout of `directory`, open the task's split the way lmms-eval will, check it."""
    what = f"--task-data {task}={directory}"
    root = directory / spec.config if spec.config and (directory / spec.config).is_dir() else directory
    if (root / "dataset_dict.json").is_file():
        layout, override = "saved", {"dataset_path": str(root), "dataset_name": None,
                                     "dataset_kwargs": {"load_from_disk": True}}
    elif (root / "state.json").is_file():
        raise PrismError(f"{what}: a single saved Dataset, not a DatasetDict with split {spec.split!r}",
                         hint=f"save it as datasets.DatasetDict({{{spec.split!r}: ds}}).save_to_disk(DIR)")
    elif has_readme_configs(directory):
        # Read as lmms-eval reads a hub dataset, but with the files named by absolute path: `datasets` caches a
        # local folder by its name and the README's relative patterns, and would serve an older copy's rows.
        files = snapshot_files(what, directory, spec)
        layout, override = "snapshot", files_override(what, spec.split, files)
    else:
        files = split_files(root, spec.split)
        if not files:
            found = sorted({p.name for p in root.rglob("*.parquet")})[:6]
            raise PrismError(f"{what}: no data for {task}'s split {spec.split!r}: expected a save_to_disk "
                             f"DatasetDict, a hub snapshot or {spec.split}-*.parquet; found "
                             f"{', '.join(found) + ' (parquet)' if found else 'no dataset files'}",
                             hint=f"the hub copy is {spec.hub_id}" + (f" (config {spec.config!r})" if spec.config else ""))
        layout, override = "parquet", files_override(what, spec.split, files)
    if stored_rows(layout, override, spec.split) == 0:  # `datasets` cannot open an empty split at all
        raise PrismError(f"{what}: split {spec.split!r} of the copy is empty")
    dataset = load_split(what, task, layout, override, spec)
    check_columns(what, task, spec, dataset)
    return LocalCopy(task, layout, len(dataset), override)


def stored_rows(layout: str, override: dict, split: str) -> int | None:
    """Rows of the split as its files record them (None when unknown); read without loading the data."""
    import json

    import pyarrow.parquet as pq

    if override["dataset_path"] == "parquet":
        return sum(pq.ParquetFile(f).metadata.num_rows for f in override["dataset_kwargs"]["data_files"][split])
    if layout == "saved":
        state = Path(override["dataset_path"]) / split / "state.json"
        if state.is_file():
            return None if json.loads(state.read_text()).get("_data_files") else 0
    return None


BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def files_override(what: str, split: str, files: list[Path]) -> dict:
    """lmms-eval's dataset settings for a split made of these files (the `datasets` builder by extension)."""
    builders = {BUILDERS.get(f.suffix.lower()) for f in files}
    if len(builders) != 1 or None in builders:
        raise PrismError(f"{what}: split {split!r} is made of {', '.join(sorted({f.suffix or f.name for f in files}))} "
                         f"files; prism reads one of {', '.join(sorted(BUILDERS))} per split")
    return {"dataset_path": builders.pop(), "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: [str(f) for f in files]}}}


def snapshot_files(what: str, directory: Path, spec: DataSpec) -> list[Path]:
    """The files the snapshot's README `configs:` list for the task's config and split."""
    import yaml

    header = yaml.safe_load((directory / "README.md").read_text(encoding="utf-8", errors="replace").split("---")[1])
    configs = [c for c in (header or {}).get("configs") or [] if isinstance(c, dict)]
    wanted = spec.config or "default"
    chosen = next((c for c in configs if c.get("config_name") == wanted), None)
    if chosen is None and spec.config is None:
        chosen = next((c for c in configs if c.get("default")), configs[0] if len(configs) == 1 else None)
    if chosen is None:
        raise PrismError(f"{what}: the snapshot's README has no config {wanted!r}; it has "
                         f"{', '.join(repr(c.get('config_name')) for c in configs)}",
                         hint=f"the hub copy is {spec.hub_id}")
    entries = chosen.get("data_files") or []
    if isinstance(entries, (str, dict)):
        entries = [entries] if isinstance(entries, str) else [{"split": k, "path": v} for k, v in entries.items()]
    patterns = {}
    for entry in entries:
        split, path = ("train", entry) if isinstance(entry, str) else (entry.get("split", "train"), entry.get("path"))
        patterns.setdefault(split, []).extend([path] if isinstance(path, str) else list(path or []))
    if spec.split not in patterns:
        raise PrismError(f"{what}: {spec.hub_id.split('/')[-1]} config {wanted!r} has no split {spec.split!r} "
                         f"(the README lists {', '.join(map(repr, patterns)) or 'none'})")
    files = sorted({f for pattern in patterns[spec.split] for f in directory.glob(pattern) if f.is_file()})
    if not files:
        raise PrismError(f"{what}: the README's files for split {spec.split!r} ({', '.join(patterns[spec.split])}) "
                         "are not in the snapshot", hint="download the whole repository, or include those files")
    return files


def has_readme_configs(directory: Path) -> bool:
    readme = directory / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    header = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    return bool(re.search(r"^configs:", header, re.M))


def split_files(root: Path, split: str) -> list[Path]:
    """Parquet files of one split: `<split>-00000-of-00001.parquet`, `<split>.parquet`, or any file in a folder
    named `<split>` (`test-*` is not `testmini-*`)."""
    named = re.compile(rf"^{re.escape(split)}([-_.]|$)")
    files = [p for p in root.rglob("*.parquet")
             if named.match(p.name) or split in p.relative_to(root).parts[:-1]]
    return sorted(files)


def load_split(what: str, task: str, layout: str, override: dict, spec: DataSpec):
    """The task's split from the copy, opened with the same `datasets` call lmms-eval makes."""
    import datasets

    kwargs = dict(override["dataset_kwargs"])
    try:
        if kwargs.pop("load_from_disk", False):
            loaded = datasets.load_from_disk(override["dataset_path"])
        else:
            loaded = datasets.load_dataset(override["dataset_path"], name=override["dataset_name"], **kwargs)
    except Exception as e:  # a broken copy in any of datasets' many ways: one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrismError(f"{what}: cannot read the {layout} copy: {type(e).__name__}: {first[:300]}") from e
    splits = list(loaded.keys()) if hasattr(loaded, "keys") else []
    if spec.split not in splits:
        raise PrismError(f"{what}: {task} reads split {spec.split!r}; the copy has "
                         f"{', '.join(map(repr, splits)) or 'no splits'}",
                         hint=f"the hub copy is {spec.hub_id}" + (f" (config {spec.config!r})" if spec.config else ""))
    dataset = loaded[spec.split]
    if len(dataset) == 0:
        raise PrismError(f"{what}: split {spec.split!r} of the copy is empty")
    return dataset


def kind_of(feature) -> str:
    """The KINDS name of a `datasets` feature."""
    import datasets

    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, (datasets.Sequence, datasets.List, datasets.LargeList, list)):
        return "list"
    if isinstance(feature, datasets.Value):
        return "text" if feature.dtype in ("string", "large_string") else "scalar"
    if isinstance(feature, dict):
        keys = set(feature)
        return "image-struct" if {"bytes", "path"} <= keys else "struct"
    return type(feature).__name__


def check_columns(what: str, task: str, spec: DataSpec, dataset) -> None:
    """Refuse a copy whose columns differ from what the task reads, in one line listing all differences."""
    found = {name: kind_of(f) for name, f in dataset.features.items()}
    problems = []
    for column, kind in spec.columns.items():
        if column not in found:
            problems.append(f"no {column!r}")
        elif kind != "any" and found[column] != kind and not (kind == "scalar" and found[column] == "text"):
            problems.append(f"{column!r} is {found[column]}, not {KINDS[kind]}")
    if problems:
        expected = ", ".join(f"{c} ({k})" for c, k in spec.columns.items())
        have = ", ".join(f"{c} ({k})" for c, k in found.items())
        raise PrismError(f"{what}: not {spec.hub_id} as {task} reads it: {'; '.join(problems)}. "
                         f"Expected columns: {expected}. Found: {have}",
                         hint="docs/eval-offline.md says how to copy each benchmark")
