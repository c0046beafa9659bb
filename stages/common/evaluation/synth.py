"""synth scored by the project's verifier: the one scorer `prism eval` (natively and through its lmms-eval task) and
the evaluation inside training (stages.common.evaluation.held_out) share, so a curve drawn during training and a
`prism eval` afterwards measure the same thing.

Besides answer accuracy, each response's caption is checked against the scene (the objects it names vs
the objects drawn): a wrong answer under a correct caption is a reasoning error, one under a wrong caption
a perception error, so the two are reported apart.
"""

from __future__ import annotations

import math

from stages.common.contract import console
from stages.common.contract.samples import Sample
from stages.common.protocol import parse_response
from stages.common.rewards import compute_score
from stages.common.world.synth import caption_accuracy


def rule_score(response: str, ground_truth: str, choices: list[str] | None = None,
               equivalents: list[str] | None = None) -> dict:
    """The project's verifier on a protocol response: acc without the format gate, format reported apart."""
    scored = compute_score(response, str(ground_truth), choices=choices or None, equivalents=equivalents or None,
                           require_format=False)
    return {"acc": float(scored["acc"]), "format": float(parse_response(response).format_ok),
            "pred": scored.get("pred")}


def score_synth(sample: Sample, response: str) -> dict:
    """acc/format/pred by the project's verifier, plus the caption's precision/recall/F1 against the scene."""
    scored = rule_score(response, sample.answer, choices=sample.choices)
    caption = caption_accuracy(parse_response(response).caption or "", sample)
    return {**scored, "caption_precision": float(caption["precision"]), "caption_recall": float(caption["recall"]),
            "caption_f1": float(caption["f1"])}


def error_kind(record: dict) -> str:
    """right | perception (wrong answer, caption misses or invents objects) | reasoning (caption right)."""
    if record["acc"] >= 1.0:
        return "right"
    return "reasoning" if record["caption_f1"] >= 1.0 else "perception"


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)); stderr 0 for fewer than two values."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(records: list[dict]) -> dict:
    """The synth entry of results.json: answer accuracy as the metric; caption and error split as extras."""
    acc, stderr = mean_and_stderr([r["acc"] for r in records])
    n = len(records)
    kinds = [error_kind(r) for r in records]
    extra = {
        "format": mean_and_stderr([r["format"] for r in records])[0],
        "caption_f1": mean_and_stderr([r["caption_f1"] for r in records])[0],
        "caption_precision": mean_and_stderr([r["caption_precision"] for r in records])[0],
        "caption_recall": mean_and_stderr([r["caption_recall"] for r in records])[0],
        "perception_errors": kinds.count("perception") / n if n else 0.0,
        "reasoning_errors": kinds.count("reasoning") / n if n else 0.0,
        "refused": sum("refused" in r for r in records),
    }
    return {"metric": "acc", "value": acc, "n": n, "stderr": stderr, "extra": extra}


def evaluate(engine, samples: list[Sample], params, batch_size: int = 16) -> list[dict]:
    """Generate for every sample with the rollout engine and score it: one record per sample."""
    # imported here: the scorer above is read by eval's config when the CLI starts, which must not load torch
    from stages.common.data.chat import screened_rollout_prompts

    records = []
    with console.progress("synth", total=len(samples)) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            prompts, refused = screened_rollout_prompts(batch, engine.processor)
            outputs = engine.generate(prompts, params)
            for i, (sample, completions) in enumerate(zip(batch, outputs)):
                # a refused image scores as no answer (it stays in n) and is named in its record and the log
                response = "" if i in refused else completions[0].text
                record = {"id": sample.id, "task": sample.task, "question": sample.question,
                          "answer": sample.answer, "response": response, **score_synth(sample, response)}
                if i in refused:
                    console.warn(f"eval: the processor refuses a prompt, scored as unanswered ({refused[i]})")
                    record["refused"] = refused[i]
                records.append(record)
            bar.advance(len(batch))
    return records

