"""`prism eval`: benchmark checkpoints, read top to bottom.

    --compare DIR...  -> print the paper-style table of finished evaluations, done
    plan the tasks (aliases, overrides, judge) -> refuse what cannot run (lmms-eval missing, bad checkpoint)
    -> for each checkpoint: open its eval directory -> load policy + processor + rollout engine
       -> synth natively -> everything else through lmms-eval with the prism model -> results.json,
          samples/<task>.jsonl, a table -> manifest
    -> several checkpoints: the comparison table

Output: one eval checkpoint (stage "eval") per --ckpt. With one --ckpt, --out is that directory (default:
eval-<name> beside a checkpoint directory, ./eval-<name> for tiny and hub ids); with several, --out is
their parent (default: each checkpoint's own default).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from stages.common.contract import checkpoint, console
from stages.common.contract.config import to_dict
from stages.common.contract.plots import plot_eval
from stages.common.models.loading import load_policy, load_processor
from stages.common.rollout import SamplingParams, check_engine, make_engine
from stages.common.world.synth import load
from stages.common.evaluation import synth as synth_eval
from stages.eval import compare, lmms_runner, synth_native, task_data
from stages.eval.config import EvalConfig
from stages.eval.lmms_plugin import PrismLMM
from stages.eval.tasks import PAPER_TASKS, TaskPlan, parse_judge, plan_tasks


def run(cfg: EvalConfig) -> Path | None:
    if cfg.compare:
        compare.show(cfg.compare, cfg.markdown, cfg.bootstrap, cfg.seed)
        return None
    parse_judge(cfg.judge)
    plans = plan_tasks(cfg.tasks, cfg.judge, cfg.synth_backend)
    lmms_runner.require_lmms(plans)
    local_copies = task_data.resolve(cfg.task_data, plans) if cfg.task_data else {}  # seconds: before indexing
    lmms_runner.check_known(plans)
    specs = [checkpoint.require_stage(checkpoint.resolve(ref), checkpoint.POLICY_STAGES) for ref in cfg.ckpt]
    outs = output_dirs(cfg.out, specs)
    synth_samples = load_synth(cfg) if any(p.name == "synth" for p in plans) else []
    if cfg.dry_run:
        print_plan(plans, specs, outs)
        return None
    check_engine(cfg.engine)  # before any --out is touched

    for spec, out in zip(specs, outs):
        evaluate_checkpoint(cfg, spec, out, plans, synth_samples, local_copies)
    if len(specs) > 1:
        compare.show([str(o) for o in outs], cfg.markdown, cfg.bootstrap, cfg.seed)
        return None
    return outs[0]


def evaluate_checkpoint(cfg: EvalConfig, spec, out: Path, plans: list[TaskPlan], synth_samples,
                        local_copies: dict | None = None) -> Path:
    config = dict(to_dict(cfg), ckpt=[spec.ref], out=str(out))
    checkpoint.check_output(str(out), "eval", config, cfg.overwrite, cfg.resume)
    processor = load_processor(spec)
    model = load_policy(spec, dtype=cfg.dtype, train=False)
    run_dir = checkpoint.open_output(str(out), "eval", config, [("policy", spec)], overwrite=cfg.overwrite,
                                     resume=cfg.resume)
    engine = make_engine(cfg.engine, model, processor, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    console.info(f"evaluating {spec.describe()} with the {engine.name} engine -> {out}")

    results: dict[str, dict] = {}
    samples: dict[str, list[dict]] = {}
    if any(p.backend == "native" for p in plans):
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        records = synth_eval.evaluate(engine, synth_samples, greedy, cfg.batch_size)
        results["synth"] = dict(synth_eval.summarize(records), scorer="rule", lmms_tasks=[])
        samples["synth"] = records
    lmms_plans = [p for p in plans if p.backend == "lmms"]
    if lmms_plans:
        lmms_results, lmms_samples = evaluate_with_lmms(cfg, spec, engine, lmms_plans, synth_samples, run_dir.path,
                                                        local_copies or {})
        results.update(lmms_results)
        samples.update(lmms_samples)

    results = {p.name: results[p.name] for p in plans}  # the order asked for
    write_samples(run_dir.path / "samples", samples)
    report = results_report(cfg, spec, engine.name, results)
    report["probe_gap"] = getattr(engine, "last_probe_gap", None)   # vllm: engine vs checkpoint on the probe
    (run_dir.path / compare.RESULTS).write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    print_results(spec.ref, results)
    plot_eval(results, run_dir.path / "results.png", f"prism eval of {spec.ref}")
    summary = {name: r["value"] for name, r in results.items()}
    if report["average"] is not None:
        summary["average"] = report["average"]
    if report["paper_average"] is not None:
        summary["paper_average"] = report["paper_average"]["value"]
    refused = sum(r.get("extra", {}).get("refused", 0) for r in results.values())
    if refused:   # scored as unanswered: named here so a low score is not read as the model's
        summary["prompts_refused"] = refused
    return run_dir.finalize(summary=summary, data={"synth": cfg.synth} if synth_samples else None)


def evaluate_with_lmms(cfg, spec, engine, plans: list[TaskPlan], synth_samples, run_path: Path,
                       local_copies: dict):
    """The lmms-eval tasks with the prism model wrapped around the already loaded engine; tasks given
    --task-data read their local copy."""
    include = []
    if any(p.name == "synth" for p in plans):
        include.append(synth_native.write_lmms_task(run_path / "lmms_synth", synth_samples, cfg.max_new_tokens))
    lmm = PrismLMM(pretrained=spec.ref, rollout_engine=engine, max_new_tokens=cfg.max_new_tokens,
                   batch_size=cfg.batch_size, seed=cfg.seed)
    overrides = {task: copy.override for task, copy in local_copies.items()}
    raw = lmms_runner.evaluate(lmm, plans, include, cfg.limit, cfg.judge, cfg.seed, overrides)
    results, samples = {}, {}
    for plan in plans:
        results[plan.name] = lmms_runner.task_result(raw, plan)
        rows = [row for task in plan.lmms_tasks for row in lmms_runner.sample_records(raw, task, lmm.responses)]
        if plan.name == "synth":
            add_error_split(results[plan.name], rows)
        results[plan.name].setdefault("extra", {})["refused"] = sum(task in plan.lmms_tasks for task, _ in lmm.refused)
        samples[plan.name] = rows
    return results, samples


def add_error_split(result: dict, rows: list[dict]) -> None:
    """Perception / reasoning error shares for synth rows scored through lmms-eval."""
    kinds = [synth_eval.error_kind(r) for r in rows if "acc" in r and "caption_f1" in r]
    if kinds:
        result["extra"]["perception_errors"] = kinds.count("perception") / len(kinds)
        result["extra"]["reasoning_errors"] = kinds.count("reasoning") / len(kinds)


# ------------------------------------------------------------------------------------------- pieces

def output_dirs(out: str, specs) -> list[Path]:
    if len(specs) == 1:
        return [Path(out).expanduser() if out else checkpoint.default_eval_dir(specs[0])]
    dirs = []
    for spec in specs:
        path = checkpoint.default_eval_dir(spec)
        path = Path(out).expanduser() / path.name if out else path
        while path in dirs:  # two checkpoints with the same directory name
            path = path.with_name(path.name + "-2")
        dirs.append(path)
    return dirs


def load_synth(cfg: EvalConfig):
    samples = load(cfg.synth, seed=cfg.seed)
    return samples[:cfg.limit] if cfg.limit else samples


def write_samples(directory: Path, samples: dict[str, list[dict]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in samples.items():
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, default=str, ensure_ascii=False) + "\n")


def results_report(cfg: EvalConfig, spec, engine_name: str, results: dict) -> dict:
    values = [r["value"] for r in results.values()]
    return {
        "checkpoint": {"ref": spec.ref, "kind": spec.kind, "stage": spec.stage, "fingerprint": spec.fingerprint},
        "judge": "none" if parse_judge(cfg.judge) is None else parse_judge(cfg.judge)[1],
        "engine": engine_name,
        "limit": cfg.limit,
        "max_new_tokens": cfg.max_new_tokens,
        "tasks": results,
        "average": sum(values) / len(values) if values else None,
        "paper_average": paper_average(results),
    }


def paper_average(results: dict) -> dict | None:
    """The paper's headline number: the mean accuracy over its benchmarks (the seven of PAPER_TASKS) among
    those evaluated, with the standard error of that mean (the benchmarks are independent samples) and the
    rows behind it; None under two benchmarks."""
    names = [name for name in PAPER_TASKS if name in results]
    if len(names) < 2:
        return None
    k = len(names)
    return {"value": sum(results[n]["value"] for n in names) / k,
            "stderr": math.sqrt(sum(results[n]["stderr"] ** 2 for n in names)) / k,
            "n": sum(results[n]["n"] for n in names), "benchmarks": names, "complete": k == len(PAPER_TASKS)}


def print_results(ref: str, results: dict) -> None:
    """One row per task, then the paper's average over its benchmarks (accuracy, standard error, n in %)."""
    rows = []
    for name, r in results.items():
        extra = r.get("extra", {})
        notes = ", ".join(f"{k} {100 * v:.1f}" for k, v in extra.items()
                          if k in ("format", "caption_f1", "perception_errors", "reasoning_errors"))
        rows.append([name, r["metric"], round(100 * r["value"], 1), round(100 * r["stderr"], 1), r["n"], r["scorer"],
                     notes])
    paper = paper_average(results)
    if paper:
        label = "average" if paper["complete"] else f"average ({len(paper['benchmarks'])} of the paper's {len(PAPER_TASKS)})"
        rows.append([label, "mean acc", round(100 * paper["value"], 1), round(100 * paper["stderr"], 1), paper["n"],
                     "", "" if paper["complete"] else "over " + ", ".join(paper["benchmarks"])])
    console.print_table(f"eval of {ref} (%)", ["task", "metric", "value", "stderr", "n", "scored by", "also"], rows)


def print_plan(plans: list[TaskPlan], specs, outs: list[Path]) -> None:
    console.print_table("eval plan", ["task", "runs as", "scored by"],
                        [[p.name, "native" if p.backend == "native" else ", ".join(p.lmms_tasks), p.scorer]
                         for p in plans])
    console.print_table("checkpoints", ["checkpoint", "output"], [[s.describe(), str(o)] for s, o in zip(specs, outs)])
