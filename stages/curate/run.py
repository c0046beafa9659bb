"""`prism curate`: problems -> (student pass@k selection) -> teacher demonstrations through the quality
gate -> a curate checkpoint (data/ shards with images embedded, stats in prism.json)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
from pathlib import Path

from stages.common.contract import console
from stages.common.contract.checkpoint import open_output, require_stage, resolve
from stages.common.contract.config import to_dict
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample, Teacher, fingerprint_samples, write_shards
from stages.common.data.chat import question_text
from stages.common.data.formats import load_samples
from stages.common.protocol import SYSTEM_PROMPT
from stages.curate import pricing
from stages.curate.cache import JsonlCache
from stages.curate.collect import Collector, Tally
from stages.curate.config import CurateConfig
from stages.curate.resilience import RetryPolicy
from stages.curate.selection import count_correct, keep_unsolved, pass_histogram
from stages.curate.teachers import TEACHERS, make_teacher, parse_teacher, teacher_kind

TEACHER_CACHE = "teacher_cache.jsonl"
STUDENT_CACHE = "student_cache.jsonl"


def run(cfg: CurateConfig) -> Path | None:
    spec = parse_teacher(cfg.teacher)
    if cfg.batch and not teacher_kind(spec).batch_api:
        raise UsageError(f"--batch needs a teacher with a batch API ("
                         f"{', '.join(k.syntax for k in TEACHERS.values() if k.batch_api)}), not {cfg.teacher!r}")
    if teacher_kind(spec).check_credentials and not cfg.dry_run:
        teacher_kind(spec).check_credentials()  # a missing key is one clear line before any work

    # 1. the problems, in source order (those --gate verify could never pass are not paid for)
    samples, sources = load_sources(cfg)
    samples = drop_unverifiable(cfg, samples)

    # 2. the plan (and, for --dry-run, nothing more)
    show_plan(cfg, spec, samples)
    if cfg.dry_run:
        return None

    # 3. the teacher: credentials are checked here, before any work
    teacher = make_teacher(spec, cfg)

    # 4. the output directory (a partial one is resumed with --resume; its cache replays every answer)
    student = (require_stage(resolve(cfg.student, role="--student"), ("base", "sft", "align", "rl"), role="--student")
               if cfg.select == "unsolved" else None)
    out = open_output(cfg.out, "curate", to_dict(cfg), parents=[("student", student)] if student else [],
                      overwrite=cfg.overwrite, resume=cfg.resume)
    with disk_errors(cfg.out):
        return _curate_into(cfg, teacher, student, out, samples, sources)


# A full or read-only disk is the machine's state, not a prism bug: one line that says so, and how to go on.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def disk_errors(out: str):
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        why = e.strerror or str(e).splitlines()[0]
        if e.errno == errno.ENOSPC and "space" not in why.lower():  # pyarrow: "Error writing bytes to file"
            why = f"no space left on device ({why})"
        raise PrismError(f"cannot write to --out {out}: {why}",
                         hint="free some space or choose another --out, then re-run with --resume") from None


def _curate_into(cfg: CurateConfig, teacher, student, out, samples: list[Sample], sources: dict) -> Path:
    state = out.state_dir
    state.mkdir(parents=True, exist_ok=True)
    if out.resuming:
        console.info(f"resuming {out.path}")

    # 5. selection: what the student cannot solve
    pass_counts: dict[str, int] = {}
    selected = samples
    if student is not None:
        selected, pass_counts = select_unsolved(cfg, samples, state)

    # 6. teacher demonstrations through the quality gate (--batch: the Gemini Batch API, at half the price)
    if cfg.batch:
        from stages.curate.batch import ask_teacher_in_batches

        outcomes, tally = ask_teacher_in_batches(cfg, teacher, selected, state, state / TEACHER_CACHE)
    else:
        outcomes, tally = ask_teacher(cfg, teacher, selected, state)

    # 7. the curated data, in source order, and the checkpoint
    kept = [curated_sample(s, o, teacher.name, pass_counts.get(s.id), cfg.k) for s, o in zip(selected, outcomes)
            if o.kept]
    if not kept:
        console.warn("no demonstration passed the quality gate; the checkpoint holds an empty data shard")
    write_shards(kept, out.path / "data")
    summary = summarize(cfg, teacher, samples, selected, outcomes, tally, pass_counts, sources)
    show_summary(summary)
    return out.finalize(summary=summary, data={"sources": sources, "curated": fingerprint_samples(kept)})


# ------------------------------------------------------------------------------------------- steps

def load_sources(cfg: CurateConfig) -> tuple[list[Sample], dict]:
    samples: list[Sample] = []
    sources: dict[str, dict] = {}
    seen: set[str] = set()
    for spec in cfg.source:
        got, problems = load_samples(spec, strict=cfg.strict, seed=cfg.seed)
        if problems:
            console.warn(f"{spec}: skipped {len(problems)} malformed row(s)")
            for line in problems[:10]:
                console.info(f"  {line}")
            if len(problems) > 10:
                console.info(f"  ... and {len(problems) - 10} more")
        dupes = [s for s in got if s.id in seen]
        if dupes:
            console.warn(f"{spec}: {len(dupes)} id(s) already given by an earlier --source were skipped")
            got = [s for s in got if s.id not in seen]
        seen.update(s.id for s in got)
        sources[spec] = {"rows": len(got), "malformed": len(problems), "fingerprint": fingerprint_samples(got)}
        samples += got
    if cfg.limit:
        samples = samples[:cfg.limit]
    if not samples:
        raise PrismError(f"no usable problems in {', '.join(cfg.source)}")
    return samples, sources


def drop_unverifiable(cfg: CurateConfig, samples: list[Sample]) -> list[Sample]:
    """--gate verify keeps a demonstration only if its answer matches the ground truth: a problem with no
    answer can never pass, so its teacher calls would be paid for nothing."""
    if cfg.gate != "verify":
        return samples
    answered = [s for s in samples if s.answer.strip()]
    if not answered:
        raise PrismError(f"--gate verify needs ground-truth answers, and none of the {len(samples)} problem(s) in "
                         f"{', '.join(cfg.source)} has one: every teacher call would be paid for and rejected",
                         hint="use --gate format (keeps well-formed replies) or add an answer column")
    if len(answered) < len(samples):
        console.warn(f"--gate verify: skipped {len(samples) - len(answered)} problem(s) without a ground-truth "
                     f"answer (they could never pass the gate)")
    return answered


def show_plan(cfg: CurateConfig, spec, samples: list[Sample]) -> None:
    n = len(samples)
    rows = [["problems", n], ["selection", f"{cfg.select}" + (f" (student {cfg.student}, k={cfg.k}, "
                                                               f"pass rate <= {cfg.max_pass}: {n * cfg.k} rollouts)"
                                                               if cfg.select == "unsolved" else "")],
            ["teacher", spec.name], ["gate", f"{cfg.gate}, up to {cfg.attempts} attempt(s)"]]
    if teacher_kind(spec).remote:
        est = estimate_cost(cfg, spec, samples)
        rows += [["teacher calls", f"{n} (at most {n * cfg.attempts}); fewer after selection"],
                 ["robustness", f"concurrency {cfg.concurrency}, rpm {cfg.rpm or 'unlimited'}, "
                                f"{cfg.max_retries} retries, timeout {cfg.timeout:g}s"],
                 ["estimated prompt", f"{est['prompt']:,} (~{est['prompt'] // max(n, 1):,} per call)"],
                 ["estimated output", f"{est['output']:,} (output + thoughts, {cfg.est_output_tokens}/call)"],
                 ["estimated cost", est["text"]]]
        if cfg.batch:
            rows.append(["batch", f"input {cfg.batch_input}, up to {cfg.batch_shard_requests} requests a job, "
                                  f"poll every {cfg.batch_poll:g}s, {cfg.batch_retries} re-batch(es) of failed keys"
                                  + (", then interactive" if cfg.batch_fallback else "")])
    console.print_table("curate plan" + (" (dry run: nothing will be called)" if cfg.dry_run else ""),
                        ["", ""], rows)


def estimate_cost(cfg: CurateConfig, spec, samples: list[Sample]) -> dict:
    prompt = 0
    for s in samples:
        prompt += pricing.estimate_prompt_tokens(SYSTEM_PROMPT + question_text(s), pricing.image_sizes(s.images))
    output = cfg.est_output_tokens * len(samples)
    usage = {"prompt_tokens": prompt, "output_tokens": output}
    price = pricing.price_for(spec.model, cfg.prices) if teacher_kind(spec).priced else None
    if price is None:
        text = f"unpriced model {spec.model} (add it with --set prices=...)"
    else:
        one = pricing.cost({**usage, "batch": cfg.batch}, spec.model, cfg.prices)  # --batch: half price
        text = (f"~${one:,.2f} for one attempt each, ~${one * cfg.attempts:,.2f} at most "
                f"(${price['input']}/${price['output']} per 1M in/out{', Batch API at 50%' if cfg.batch else ''}; "
                f"estimate)")
    return {"prompt": prompt, "output": output, "text": text}


def select_unsolved(cfg: CurateConfig, samples: list[Sample], state: Path) -> tuple[list[Sample], dict[str, int]]:
    with JsonlCache(state / STUDENT_CACHE) as cache, console.progress(f"student pass@{cfg.k}", len(samples)) as bar:
        counts = count_correct(samples, cfg.student, k=cfg.k, temperature=cfg.student_temperature,
                               max_new_tokens=cfg.student_max_new_tokens, seed=cfg.seed, engine=cfg.rollout_engine,
                               batch_size=cfg.rollout_batch, cache=cache, progress=bar)
    pass_counts = {s.id: c for s, c in zip(samples, counts)}
    selected = [s for s, c in zip(samples, counts) if keep_unsolved(c, cfg.k, cfg.max_pass)]
    console.info(f"selected {len(selected)}/{len(samples)} problems with student pass rate <= {cfg.max_pass}")
    return selected, pass_counts


def ask_teacher(cfg: CurateConfig, teacher, samples: list[Sample], state: Path):
    tally = Tally(teacher.model, cfg.prices)
    policy = RetryPolicy(max_retries=cfg.max_retries, base=cfg.backoff, cap=cfg.backoff_max)
    cache = JsonlCache(state / TEACHER_CACHE)
    if cache.torn:
        console.info(f"dropped {cache.torn} torn line(s) at the end of the teacher cache (a killed run)")
    try:
        collector = Collector(teacher, cache, attempts=cfg.attempts, gate=cfg.gate, seed=cfg.seed,
                              concurrency=cfg.concurrency, rpm=cfg.rpm, policy=policy, tally=tally)
        with console.progress(f"teacher {teacher.name}", len(samples)) as bar:
            outcomes = collector.run(samples, bar)
    finally:
        cache.close()
        teacher.close()
    return outcomes, tally


def curated_sample(sample: Sample, outcome, teacher_name: str, student_correct: int | None, k: int) -> Sample:
    v = outcome.verdict
    usage = {**outcome.usage, "attempts": outcome.attempts}
    if outcome.detail:
        usage["detail"] = outcome.detail
    meta = dict(sample.meta)
    curate = {"attempts": outcome.attempts, "teacher_correct": v.correct}
    if student_correct is not None:
        curate["student_pass"] = {"k": k, "correct": student_correct, "rate": student_correct / k}
    meta["curate"] = curate
    return dataclasses.replace(sample, teacher=Teacher(caption=v.caption, think=v.think, answer=v.answer,
                                                       model=teacher_name, usage=usage), meta=meta)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def _usage(u: dict) -> dict:
    # no "token" in summary keys: the manifest redacts keys that look like secrets ("token")
    return {k.removesuffix("_tokens"): int(u.get(k, 0)) for k in ("prompt_tokens", "output_tokens",
                                                                   "thought_tokens", "total_tokens")}


def summarize(cfg, teacher, samples, selected, outcomes, tally, pass_counts, sources) -> dict:
    checked = [c for o in outcomes for c in o.correct]
    first = [o.correct[0] for o in outcomes if o.correct and o.reasons and o.reasons[0] in
             ("kept", "wrong_answer")]
    summary = {
        "problems": len(samples),
        "malformed_rows": sum(s["malformed"] for s in sources.values()),
        "selected": len(selected),
        "kept": sum(o.kept for o in outcomes),
        "rejected": _count(o.verdict.reason for o in outcomes if not o.kept),
        "attempt_verdicts": _count(r for o in outcomes for r in o.reasons),
        "finish": dict(sorted(tally.finishes.items())),
        "teacher": teacher.name,
        "gate": cfg.gate,
        "teacher_accuracy": (sum(checked) / len(checked)) if checked else None,
        "teacher_first_attempt_accuracy": (sum(first) / len(first)) if first else None,
        "calls": {"answered_this_run": tally.calls, "replayed_from_cache": tally.cached,
                  "retries": dict(sorted(tally.retries.items()))},
        "usage": _usage(tally.usage_all),
        "usage_this_run": _usage(tally.usage_new),
    }
    price = pricing.price_for(teacher.model, cfg.prices) if TEACHERS.get(teacher.kind).priced else None
    if price is not None:
        summary["cost_usd_estimate"] = round(pricing.cost(tally.usage_all, teacher.model, cfg.prices), 6)
        summary["price_per_million"] = dict(price)
    if getattr(tally, "batch", None):  # --batch: jobs, their final states, tokens billed at the batch price
        summary["batch"] = {**tally.batch, "usage_at_batch_price": {
            k.removeprefix("batch_").removesuffix("_tokens"): v for k, v in tally.usage_all.items()
            if k.startswith("batch_")}}
    if pass_counts:
        summary["student_pass"] = {"k": cfg.k, "max_pass": cfg.max_pass,
                                   "histogram": pass_histogram(list(pass_counts.values()), cfg.k)}
    return summary


def show_summary(summary: dict) -> None:
    rows = [["problems", summary["problems"]], ["selected", summary["selected"]], ["kept", summary["kept"]]]
    rows += [[f"rejected: {k}", v] for k, v in summary["rejected"].items()]
    if summary["teacher_accuracy"] is not None:
        rows.append(["teacher accuracy", f"{summary['teacher_accuracy']:.3f}"])
    u = summary["usage"]
    if u["total"]:
        rows.append(["tokens (prompt/output/thought)", f"{u['prompt']:,} / {u['output']:,} / {u['thought']:,}"])
    calls = summary["calls"]
    rows.append(["calls (new / cached / retries)",
                 f"{calls['answered_this_run']} / {calls['replayed_from_cache']} / {sum(calls['retries'].values())}"])
    if "cost_usd_estimate" in summary:
        rows.append(["estimated cost", f"${summary['cost_usd_estimate']:.4f}"])
    if "student_pass" in summary:
        rows.append([f"student pass@{summary['student_pass']['k']} histogram", summary["student_pass"]["histogram"]])
    console.print_table("curate", ["", ""], rows)
