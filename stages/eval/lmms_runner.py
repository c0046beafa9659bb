"""Running planned tasks through lmms-eval in this process, and reading its results back.

lmms-eval is an optional extra: `lmms_available()` says whether it is importable, and `require_lmms`
turns its absence into the one line telling how to install it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from pathlib import Path

from stages.common.contract.errors import PrismError, UsageError
from stages.eval.tasks import TaskPlan, parse_judge, task_names

INSTALL_HINT = "install the eval extra: pip install lmms-eval==0.7.3 (README: Evaluation)"
PACKAGE_TASK_DIR = Path(__file__).parent / "lmms_tasks"


def lmms_available() -> bool:
    return importlib.util.find_spec("lmms_eval") is not None


def require_lmms(plans: list[TaskPlan]) -> None:
    needing = [p.name for p in plans if p.backend == "lmms"]
    if needing and not lmms_available():
        unknown = [p.name for p in plans if p.scorer == "official"]  # not a registered prism task
        if unknown:
            raise UsageError(f"--tasks: unknown task {unknown[0]!r}: registered tasks are {', '.join(task_names())}",
                             hint="any other name is an lmms-eval task, and lmms-eval is not installed")
        raise PrismError(f"task(s) {', '.join(needing)} need lmms-eval, which is not installed",
                         hint=INSTALL_HINT + "; --tasks synth runs without it")


def check_known(plans: list[TaskPlan], task_manager=None) -> None:
    """Refuse task names lmms-eval does not know, before any model is loaded (prism_synth is written at
    run time, so it is known by construction)."""
    if not any(p.backend == "lmms" for p in plans):
        return
    known = set((task_manager or make_task_manager([PACKAGE_TASK_DIR])).all_tasks) | {"prism_synth"}
    for plan in plans:
        for task in plan.lmms_tasks:
            if task not in known:
                raise UsageError(f"--tasks: unknown task {plan.name!r}: registered tasks are "
                                 f"{', '.join(task_names())}, and lmms-eval has no task of that name",
                                 hint="`lmms-eval --tasks list` lists lmms-eval's tasks")


def make_task_manager(include_paths: list[Path]):
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=[str(p) for p in include_paths])


@contextlib.contextmanager
def judge_environment(judge: str):
    """The environment lmms-eval's judge-based scorers read (API_TYPE, OPENAI_API_URL, MODEL_VERSION);
    the key stays whatever $OPENAI_API_KEY holds (a local judge usually ignores it)."""
    parsed = parse_judge(judge)
    if parsed is None:
        yield
        return
    url, model = parsed
    wanted = {"API_TYPE": "openai", "OPENAI_API_URL": url, "MODEL_VERSION": model}
    if not os.environ.get("OPENAI_API_KEY"):
        wanted["OPENAI_API_KEY"] = "EMPTY"
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate(lmm, plans: list[TaskPlan], include_paths: list[Path], limit: int, judge: str, seed: int,
             data_overrides: dict[str, dict] | None = None) -> dict:
    """Run every lmms task of `plans` with the model instance `lmm`; the raw lmms-eval results dict.
    `data_overrides[task]` replaces where a task reads its dataset (--task-data: dataset_path, dataset_name,
    dataset_kwargs), given to lmms-eval as a task config on top of the task's own."""
    from lmms_eval.evaluator import simple_evaluate

    manager = make_task_manager([PACKAGE_TASK_DIR, *include_paths])
    names = [t for p in plans for t in p.lmms_tasks]
    data_overrides = data_overrides or {}
    tasks = [{"task": t, **data_overrides[t]} if t in data_overrides else t for t in names]
    with judge_environment(judge):
        try:
            results = simple_evaluate(model=lmm, tasks=tasks, task_manager=manager, limit=limit or None,
                                      log_samples=True, random_seed=seed, verbosity="WARNING", batch_size=1)
        except (PrismError, KeyboardInterrupt):
            raise
        except Exception as e:  # dataset download failures, judge outages: one line, traceback under --debug
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise PrismError(f"lmms-eval failed on {', '.join(names)}: {type(e).__name__}: {first}",
                             hint="offline? the benchmark datasets come from the Hugging Face hub: "
                                  "--task-data NAME=DIR reads a local copy (docs/eval-offline.md)") from e
    if not results:
        raise PrismError(f"lmms-eval returned no results for {', '.join(names)}")
    return results


def metric_of(raw: dict, task: str, metric: str) -> tuple[float, float]:
    """(value, stderr) of one task's metric in lmms-eval results; values reported in percent are scaled to 0-1."""
    entry = raw["results"].get(task)
    if entry is None:
        raise PrismError(f"lmms-eval results have no entry for task {task}")
    if not metric:  # an unknown task passed through: its first numeric metric
        metric = next((k.split(",")[0] for k, v in entry.items()
                       if "," in k and "_stderr" not in k and isinstance(v, (int, float))), "")
    value = entry.get(f"{metric},none")
    if not isinstance(value, (int, float)):
        raise PrismError(f"lmms-eval results for {task} have no numeric metric {metric!r}")
    stderr = entry.get(f"{metric}_stderr,none")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and not math.isnan(stderr) else 0.0
    scale = 100.0 if value > 1.0 else 1.0
    return float(value) / scale, stderr / scale


def task_result(raw: dict, plan: TaskPlan) -> dict:
    """One results.json entry: the mean over the plan's lmms tasks (MMMU-Pro has two subsets)."""
    values, stderrs, n = [], [], 0
    extra: dict = {}
    for task in plan.lmms_tasks:
        value, stderr = metric_of(raw, task, plan.metric)
        values.append(value)
        stderrs.append(stderr)
        n += int(raw.get("n-samples", {}).get(task, {}).get("effective", 0))
        entry = raw["results"][task]
        for key in ("format", "caption_f1"):
            if isinstance(entry.get(f"{key},none"), (int, float)):
                extra.setdefault(key, []).append(float(entry[f"{key},none"]))
        if len(plan.lmms_tasks) > 1:
            extra[task] = value
    k = len(values)
    for key in ("format", "caption_f1"):
        if key in extra:
            extra[key] = sum(extra[key]) / len(extra[key])
    return {"metric": plan.metric or "score", "value": sum(values) / k, "n": n,
            "stderr": math.sqrt(sum(s * s for s in stderrs)) / k, "scorer": plan.scorer,
            "lmms_tasks": list(plan.lmms_tasks), "extra": extra}


def sample_records(raw: dict, task: str, responses: dict) -> list[dict]:
    """Per-sample rows of one lmms task: doc id, target, full response, what lmms-eval saw, the scores."""
    rows = []
    for s in raw.get("samples", {}).get(task, []):
        doc_id = s.get("doc_id")
        filtered = s.get("filtered_resps")
        reply = filtered[0] if isinstance(filtered, list) and filtered else filtered
        row = {"task": task, "doc_id": doc_id, "target": s.get("target"),
               "response": responses.get((task, doc_id), reply), "reply": reply}
        for key, value in s.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "doc_id":
                row[key] = value
        rows.append(row)
    return rows
