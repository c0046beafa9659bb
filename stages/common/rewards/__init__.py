"""Verifiable rewards for RLVR (docs/method.md, "Verifiable reward"): score = 0.8 acc + 0.2 format.

acc is rule-based. The answer is the content of <answer> in a format-valid response (format gate);
`require_format=False` (eval) scores the best-effort <answer> block, or, without one, the last
\\boxed{}, the text after the last "answer is"/"answer:", or the last non-empty line. The answer
matches the ground truth or any of `equivalents` when one of these cheap rules says so, in order:

1. Equal after normalisation (`normalize_answer`: LaTeX -> plain text, case, spacing, delimiters).
2. Multiple choice: when the ground truth is a letter (or, with `choices`, an option's text) the
   answer must name the same letter in any common spelling ("B", "(B)", "B.", "Answer: B",
   "option b", "B. <option text>") or give that option's text/value. Decisive.
3. Multi-value: comma/semicolon/"and"-separated values. ORDER RULE: a ground truth enclosed in
   (...) or [...] is ordered (points, tuples, intervals; brackets must agree when both sides have
   them); bare lists and {...} sets are unordered (same multiset). A comma between digit groups of
   exactly three ("1,234", no space) is a thousands separator, not a list.
4. Numbers (literals, fractions, sqrt/pi/^ expressions, scientific notation, units and currency
   ignored, x= prefixes dropped) compare by value: an integer ground truth needs an exact value;
   otherwise relative tolerance 1e-4; a ground truth given exactly (fraction, root, pi) also
   accepts a decimal correctly rounded to >= 2 places with >= 2 significant digits (1/3 ~ 0.33).
   PERCENT RULE: a value written with % stands for both its number and its fraction
   ("50%" ~ 50 ~ 0.5); without % on either side 50 and 0.5 differ; "50%" ~ "50%".
   Decisive when both sides are numbers.
5. math-verify, only when no rule decided and both sides look mathematical (symbolic equivalence
   like (x+1)^2 vs x^2+2x+1), under a timeout that works from any thread.

Answers longer than MAX_ANSWER_CHARS are compared verbatim only: a real final answer is never that
long, and it bounds the time a degenerate rollout can cost.

The package, by concern: latex (normalisation), numbers (number parsing and the arithmetic parser),
matching (the cheap rules), math_verify_sandbox (math-verify under a timeout). This module is the API.
"""

from __future__ import annotations

from stages.common.protocol import parse_response
from stages.common.rewards.latex import MAX_ANSWER_CHARS, normalize_answer
from stages.common.rewards.matching import (MAX_MATH_VERIFY_CHARS, cheap_verdict, choice_letter, hashable_choices,
                                            lenient_answer, make_view, prepare_target, target_texts)
from stages.common.rewards.matching import prepare_choices  # noqa: F401 (benchmarks clear its cache)
from stages.common.rewards.math_verify_sandbox import MATH_VERIFY_TIMEOUT_S, math_verify_equal
from stages.common.rewards.numbers import REL_TOL

__all__ = ["compute_score", "answer_matches", "normalize_answer", "extract_choice_letter", "ACC_WEIGHT",
           "FORMAT_WEIGHT", "REL_TOL", "MATH_VERIFY_TIMEOUT_S", "MAX_ANSWER_CHARS"]

ACC_WEIGHT = 0.8
FORMAT_WEIGHT = 0.2


# ---------------------------------------------------------------------------------------------------
# Public API


def compute_score(response, ground_truth, choices=None, equivalents=None, *, acc_weight: float = ACC_WEIGHT,
                  format_weight: float = FORMAT_WEIGHT, require_format: bool = True,
                  math_verify_timeout_s: float = MATH_VERIFY_TIMEOUT_S) -> dict:
    """Reward of one response: {"score", "acc", "format"} as floats, plus "pred" (the answer
    string that was scored). Never raises; anything unscorable gets acc 0."""
    fmt, acc, pred = 0.0, 0.0, ""
    try:
        parsed = parse_response(response)
        fmt = 1.0 if parsed.format_ok else 0.0
        if parsed.answer is not None:
            pred = parsed.answer
        elif not require_format and isinstance(response, str):
            pred = lenient_answer(response)
        if parsed.format_ok or not require_format:
            acc = 1.0 if answer_matches(pred, ground_truth, choices, equivalents,
                                        math_verify_timeout_s=math_verify_timeout_s) else 0.0
    except Exception:  # never raise into a rollout loop: an unscorable response earns no accuracy
        acc = 0.0
    try:
        score = float(acc_weight) * acc + float(format_weight) * fmt
    except (TypeError, ValueError):
        score = ACC_WEIGHT * acc + FORMAT_WEIGHT * fmt
    return {"score": score, "acc": acc, "format": fmt, "pred": pred}


def answer_matches(pred, ground_truth, choices=None, equivalents=None, *,
                   math_verify_timeout_s: float = MATH_VERIFY_TIMEOUT_S) -> bool:
    """True if the answer string matches the ground truth or one of its equivalents. Never raises."""
    try:
        if not isinstance(pred, str):
            return False
        pred = pred.strip()
        targets = target_texts(ground_truth, equivalents)
        if not pred or not targets:
            return False
        choices_key = hashable_choices(choices)
        if len(pred) > MAX_ANSWER_CHARS:
            return any(pred == t for t in targets)
        pred_view = make_view(pred)
        undecided = []
        for text in targets:
            target = prepare_target(text, choices_key)
            verdict = cheap_verdict(pred, pred_view, target, choices_key)
            if verdict:
                return True
            if verdict is None and target.view.mathy:
                undecided.append(target.view.raw)
        if undecided and pred_view.mathy and len(pred) <= MAX_MATH_VERIFY_CHARS:
            return any(math_verify_equal(pred, gold, math_verify_timeout_s) for gold in undecided)
        return False
    except Exception:
        return False


def extract_choice_letter(text, choices=None) -> str | None:
    """The multiple-choice letter an answer names ("B", "(b)", "B.", "B)", "Answer: B", "option B",
    "B. <text>"), or, with `choices` (a list in A, B, C order, or a {letter: text} dict), the letter
    whose option text or value the answer gives. Upper case; None if the answer names no single letter."""
    try:
        if not isinstance(text, str):
            return None
        s = text.strip()
        if not s or len(s) > MAX_ANSWER_CHARS:
            return None
        choices_key = hashable_choices(choices)
        return choice_letter(s, choices_key)
    except Exception:
        return None
