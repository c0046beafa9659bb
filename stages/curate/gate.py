"""The quality gate: is a teacher reply a demonstration worth keeping? Pure functions of (reply, sample).

gate "verify" (default): the reply must be complete (not blocked, not truncated), in the protocol
format, and its answer must match the ground truth under the verifiable reward. "format": the format
only (data without ground truth). "none": keep whatever the teacher wrote (noisy public-style demos).
Every rejection has a reason; `RETRY_REASONS` are worth another sample from the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.samples import Sample
from stages.common.protocol import parse_response
from stages.common.rewards import compute_score
from stages.curate.teacher_api import Reply

GATES = ("verify", "format", "none")
RETRY_REASONS = frozenset({"wrong_answer", "bad_format", "max_tokens", "empty", "finish_other"})


@dataclass
class Verdict:
    ok: bool
    reason: str                  # "kept" or why not
    caption: str = ""
    think: str = ""
    answer: str = ""
    correct: bool | None = None  # the teacher's answer vs the ground truth (None: not checked)


def judge(reply: Reply, sample: Sample, gate: str = "verify") -> Verdict:
    if reply.finish in ("blocked", "bad_request"):
        return Verdict(False, reply.finish)
    if reply.finish == "max_tokens":
        return Verdict(False, "max_tokens")
    if not reply.text or not reply.text.strip():
        return Verdict(False, "empty")
    if reply.finish == "other":
        return Verdict(False, "finish_other")
    parsed = parse_response(reply.text)
    fields = dict(caption=parsed.caption or "", think=parsed.think or "", answer=parsed.answer or "")
    correct = answer_correct(reply.text, sample) if parsed.format_ok else None
    if gate == "none":
        return Verdict(True, "kept", correct=correct, **fields)
    if not parsed.format_ok:
        return Verdict(False, "bad_format", **fields)
    if gate == "format":
        return Verdict(True, "kept", correct=correct, **fields)
    if correct is None:
        return Verdict(False, "no_ground_truth", **fields)
    if not correct:
        return Verdict(False, "wrong_answer", correct=False, **fields)
    return Verdict(True, "kept", correct=True, **fields)


def answer_correct(text: str, sample: Sample) -> bool | None:
    if not (sample.answer or "").strip():
        return None

    return compute_score(text, sample.answer, choices=sample.choices)["acc"] >= 0.5
