"""Verifiable rewards for RLVR (REFERENCE.md 1, "RLVR stage"): score = 0.8 acc + 0.2 format.

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
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from stages.common.protocol import parse_response

ACC_WEIGHT = 0.8
FORMAT_WEIGHT = 0.2
REL_TOL = 1e-4
MATH_VERIFY_TIMEOUT_S = 2.0
MAX_ANSWER_CHARS = 2000
_MAX_LATEX_DEPTH = 48
_MAX_ITEMS = 64
_MAX_NUMBER_DIGITS = 4000  # Python refuses int() beyond 4300 digits
_MAX_MATH_VERIFY_CHARS = 300
_WORKER_START_TIMEOUT_S = 120.0

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
            pred = _lenient_answer(response)
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
        targets = _target_texts(ground_truth, equivalents)
        if not pred or not targets:
            return False
        choices_key = _choices_key(choices)
        if len(pred) > MAX_ANSWER_CHARS:
            return any(pred == t for t in targets)
        pred_view = _make_view(pred)
        undecided = []
        for text in targets:
            target = _prepare_target(text, choices_key)
            verdict = _cheap_verdict(pred, pred_view, target, choices_key)
            if verdict:
                return True
            if verdict is None and target.view.mathy:
                undecided.append(target.view.raw)
        if undecided and pred_view.mathy and len(pred) <= _MAX_MATH_VERIFY_CHARS:
            return any(_math_verify_equal(pred, gold, math_verify_timeout_s) for gold in undecided)
        return False
    except Exception:
        return False


def normalize_answer(text) -> str:
    """Canonical form of an answer for equality: LaTeX to plain text (\\frac{a}{b} -> a/b,
    \\sqrt{x} -> sqrt(x), \\text{}/\\mathrm{}/\\boxed{} unwrapped, \\left/\\right and spacing dropped,
    degrees dropped, \\% -> %), lower case, "answer:" prefixes and a final period dropped, spaces
    around symbols removed. Never raises."""
    try:
        if not isinstance(text, str):
            return ""
        s = text.strip()
        if len(s) > MAX_ANSWER_CHARS:
            return " ".join(s.lower().split())
        s = _to_plain(s)
        s = s.casefold()
        prefix = _ANSWER_PREFIX.match(s)
        if prefix:
            s = s[prefix.end():]
        s = s.strip().strip("\"'`").strip().rstrip(".").rstrip()
        s = _SPACE_BEFORE_SEPARATOR.sub(r"\1", _SPACES.sub(" ", s))
        return _SPACE_AROUND_SYMBOL.sub(r"\1", s)
    except Exception:
        return text.strip().lower() if isinstance(text, str) else ""


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
        choices_key = _choices_key(choices)
        return _choice_letter(s, choices_key)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------
# Inputs


def _target_texts(ground_truth, equivalents) -> list[str]:
    """The accepted answers: the ground truth (a list/tuple ground truth lists several) and equivalents."""
    texts = []
    for value in (ground_truth, equivalents):
        items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
        for item in items:
            if item is None or isinstance(item, bool):
                continue
            if isinstance(item, int):
                item = str(item)
            elif isinstance(item, float):
                item = str(int(item)) if item.is_integer() else repr(item)
            if isinstance(item, str) and item.strip():
                texts.append(item.strip())
    return texts


def _choices_key(choices) -> tuple[str, ...] | None:
    """Choices as a hashable tuple of option texts in letter order."""
    if not choices:
        return None
    if isinstance(choices, str):
        return None
    if isinstance(choices, dict):
        return tuple(str(choices[key]) for key in sorted(choices, key=str))[:26]
    try:
        return tuple(str(option) for option in choices)[:26]
    except TypeError:
        return None


def _lenient_answer(text: str) -> str:
    """An answer from a response without an <answer> block (eval of models that ignore the protocol)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    last = None
    for last in _ANSWER_PHRASE.finditer(text):
        pass
    if last is not None:
        return text[last.end():].split("\n", 1)[0].strip()
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for index in range(open_at, min(len(text), open_at + MAX_ANSWER_CHARS)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:index]
    return None


_ANSWER_PHRASE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)

# ---------------------------------------------------------------------------------------------------
# LaTeX / unicode to plain text (case preserved)

_FRACTIONS = frozenset({"frac", "dfrac", "tfrac", "cfrac"})
_UNWRAP = frozenset({"text", "textbf", "textit", "textrm", "textsf", "texttt", "textnormal", "mathrm", "mathbf",
                     "mathit", "mathsf", "mathtt", "mathcal", "mathbb", "operatorname", "mbox", "hbox", "boxed",
                     "fbox", "boldsymbol", "bm", "emph", "overline", "underline", "bar", "vec", "hat", "widehat",
                     "overrightarrow", "overleftrightarrow", "tilde", "widetilde", "mathring"})
_LATEX_SYMBOLS = {
    "left": "", "right": "", "big": "", "Big": "", "bigg": "", "Bigg": "", "bigl": "", "bigr": "", "Bigl": "",
    "Bigr": "", "displaystyle": "", "textstyle": "", "limits": "", "nolimits": "", "!": "", ",": "", ";": " ",
    ":": " ", " ": " ", "quad": " ", "qquad": " ", "cdot": "*", "times": "*", "ast": "*", "div": "/",
    "pi": "pi", "infty": "inf", "circ": "°", "degree": "°", "%": "%", "$": "", "#": "#", "&": "&", "_": "_",
    "{": "{", "}": "}", "le": "<=", "leq": "<=", "leqslant": "<=", "ge": ">=", "geq": ">=", "geqslant": ">=",
    "ne": "!=", "neq": "!=", "pm": "±", "mp": "∓", "approx": "≈", "sim": "~", "to": "->", "rightarrow": "->",
    "cup": "∪", "cap": "∩", "in": "∈", "angle": "∠", "triangle": "△", "perp": "⊥", "parallel": "∥",
    "prime": "'", "ldots": "...", "cdots": "...", "dots": "...", "lt": "<", "gt": ">",
}
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+|.)", re.DOTALL)
_PLAIN_RUN = re.compile(r"[^\\{}]+")
_ATOM = re.compile(r"[\w.]+(?:\([\w.]*\))?")
_DELIMITERS = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$")
# Superscripts first: NFKC would turn x² into x2.
_UNICODE_BEFORE_NFKC = str.maketrans({"²": "^2", "³": "^3", "¹": "^1", "⁰": "^0"})
_UNICODE_AFTER_NFKC = str.maketrans({"−": "-", "–": "-", "—": "-", "×": "*", "·": "*", "÷": "/", "⁄": "/",
                                     "π": "pi", "√": "sqrt", "∞": "inf", "≤": "<=", "≥": ">=", "≠": "!=",
                                     "“": '"', "”": '"', "‘": "'", "’": "'", "\u00a0": " ", "\x00": ""})


class _TooComplex(Exception):
    """LaTeX nested deeper than any real answer: normalise it as plain text instead."""


def _to_plain(s: str) -> str:
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s.translate(_UNICODE_BEFORE_NFKC)).translate(_UNICODE_AFTER_NFKC)
    if "\\" not in s and "{" not in s and "}" not in s and "$" not in s:
        return s.replace("**", "").replace("°", "")
    if "\\boxed" in s or "\\fbox" in s:
        boxed = _last_boxed(s)
        if boxed is not None:
            s = boxed
    s = _DELIMITERS.sub("", s).replace("**", "")
    try:
        s, _ = _convert_latex(s, 0, 0, False)
    except (_TooComplex, RecursionError):
        s = s.replace("{", " ").replace("}", " ").replace("\\", " ")
    return s.replace("{,}", ",").replace("^°", "").replace("°", "")


def _convert_latex(s: str, i: int, depth: int, in_group: bool) -> tuple[str, int]:
    """Convert from i up to the end (or the '}' closing the current group). Each character is read
    once, so time is linear; depth is capped so a "\\frac{" * 500 answer cannot recurse away."""
    if depth > _MAX_LATEX_DEPTH:
        raise _TooComplex
    parts = []
    n = len(s)
    while i < n:
        run = _PLAIN_RUN.match(s, i)
        if run:
            parts.append(run.group())
            i = run.end()
            continue
        char = s[i]
        if char == "}":
            if in_group:
                return "".join(parts), i + 1
            i += 1  # stray closing brace
        elif char == "{":
            inner, i = _convert_latex(s, i + 1, depth + 1, True)
            parts.append(_group(inner))
        else:
            command = _LATEX_COMMAND.match(s, i)
            if command is None:  # a lone backslash at the end
                break
            text, i = _convert_command(s, command.group(1), command.end(), depth)
            parts.append(text)
    return "".join(parts), i


def _convert_command(s: str, name: str, i: int, depth: int) -> tuple[str, int]:
    if name in _FRACTIONS:
        numerator, i = _argument(s, i, depth)
        denominator, i = _argument(s, i, depth)
        return f"{_atomic(numerator)}/{_atomic(denominator)}", i
    if name == "sqrt":
        index = None
        if i < len(s) and s[i] == "[":
            close = s.find("]", i)
            if close > 0:
                index, _ = _convert_latex(s[i + 1:close], 0, depth + 1, False)
                i = close + 1
        radicand, i = _argument(s, i, depth)
        return (f"sqrt({radicand})" if index is None else f"({radicand})^(1/{_atomic(index)})"), i
    if name in _UNWRAP:
        return _argument(s, i, depth)
    return _LATEX_SYMBOLS.get(name, name), i


def _argument(s: str, i: int, depth: int) -> tuple[str, int]:
    """One macro argument: a {group}, a \\command, or a single character (\\frac12)."""
    n = len(s)
    while i < n and s[i] == " ":
        i += 1
    if i >= n:
        return "", i
    if s[i] == "{":
        return _convert_latex(s, i + 1, depth + 1, True)
    if s[i] == "\\":
        command = _LATEX_COMMAND.match(s, i)
        if command is None:
            return "", n
        return _convert_command(s, command.group(1), command.end(), depth + 1)
    return s[i], i + 1


def _group(inner: str) -> str:
    """A LaTeX {group}: grouping (x^{10} -> x^10, ^{-1} -> ^(-1)) unless it holds a list (a set)."""
    if inner in (",", "°"):
        return inner  # 1{,}234 (LaTeX thousands separator), ^{\circ}
    if not inner or _ATOM.fullmatch(inner):
        return inner
    if "," in inner:
        return "{" + inner + "}"
    return "(" + inner + ")"


def _atomic(text: str) -> str:
    text = text.strip()
    return text if _ATOM.fullmatch(text) else f"({text})"


_ANSWER_PREFIX = re.compile(r"(?:the\s+)?(?:final\s+)?(?:answer|ans)\b\s*(?:is\b)?\s*[:：]?\s*(?=\S)")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_SEPARATOR = re.compile(r"\s+([,;])")
_SPACE_AROUND_SYMBOL = re.compile(r"\s*([^\w\s,;'\"])\s*")

# ---------------------------------------------------------------------------------------------------
# Views: an answer prepared for comparison


@dataclass(frozen=True)
class _Number:
    values: tuple  # the value, and for a percent also value / 100
    kind: str  # "int" (exact integer literal), "decimal", "sci", "exact" (fraction / expression), "overflow"
    places: int  # decimal places of a decimal literal
    significant: int  # significant digits of a decimal literal
    percent: bool


@dataclass(frozen=True)
class _View:
    raw: str
    norm: str
    number: _Number | None
    items: tuple | None  # tuple of _View for multi-value answers
    ordered: bool
    brackets: str
    mathy: bool


@dataclass(frozen=True)
class _Target:
    view: _View
    letter: str | None  # set when the ground truth is a multiple-choice letter


def _make_view(raw: str, depth: int = 0) -> _View:
    norm = normalize_answer(raw)
    split = _split_items(norm) if depth < 3 else None
    if split is not None:
        texts, ordered, brackets = split
        items = tuple(_make_view(text, depth + 1) for text in texts)
        return _View(raw, norm, None, items, ordered, brackets, _looks_mathematical(norm))
    return _View(raw, norm, _parse_number(norm), None, False, "", _looks_mathematical(norm))


@functools.lru_cache(maxsize=8192)
def _prepare_target(text: str, choices_key: tuple[str, ...] | None) -> _Target:
    """Ground truths repeat across a group's rollouts: prepare each once."""
    return _Target(_make_view(text), _choice_letter(text, choices_key) if len(text) <= MAX_ANSWER_CHARS else None)


@functools.lru_cache(maxsize=1024)
def _prepare_choices(choices_key: tuple[str, ...]) -> tuple[_View, ...]:
    return tuple(_make_view(_CHOICE_PREFIX.sub("", option.strip(), count=1)) for option in choices_key)


def _cheap_verdict(pred: str, pred_view: _View, target: _Target, choices_key) -> bool | None:
    """True / False when a cheap rule decides, None when only math-verify could."""
    gold = target.view
    if pred == gold.raw or (pred_view.norm and pred_view.norm == gold.norm):
        return True
    if target.letter is not None:
        return _choice_letter(pred, choices_key) == target.letter
    if gold.items is not None or pred_view.items is not None:
        if gold.items is not None and pred_view.items is not None:
            if _items_match(pred_view, gold):
                return True
            return None if _has_symbolic_items(pred_view) or _has_symbolic_items(gold) else False
        scalar = gold if gold.items is None else pred_view
        return None if scalar.number is None and pred_view.mathy and gold.mathy else False
    if pred_view.number is not None and gold.number is not None:
        return _numbers_match(pred_view.number, gold.number)
    return None


def _views_equal(pred: _View, gold: _View) -> bool:
    if pred.raw == gold.raw or (pred.norm and pred.norm == gold.norm):
        return True
    if pred.items is not None and gold.items is not None:
        return _items_match(pred, gold)
    if pred.number is not None and gold.number is not None:
        return _numbers_match(pred.number, gold.number)
    return False


def _items_match(pred: _View, gold: _View) -> bool:
    if len(pred.items) != len(gold.items):
        return False
    if gold.ordered:
        if pred.brackets and pred.brackets != gold.brackets:
            return False
        return all(_views_equal(p, g) for p, g in zip(pred.items, gold.items))
    unmatched = list(gold.items)
    for item in pred.items:
        for index, candidate in enumerate(unmatched):
            if _views_equal(item, candidate):
                del unmatched[index]
                break
        else:
            return False
    return True


def _has_symbolic_items(view: _View) -> bool:
    return any(item.number is None and item.items is None and item.mathy for item in view.items)


# ---------------------------------------------------------------------------------------------------
# Multiple choice

_LETTER_ALONE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:)]?")
_LETTER_PHRASE = re.compile(r"(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice|ans)"
                            r"(?:\s+is)?\s*[:：]?\s*[(\[]?([A-Za-z])[)\]]?[.:)]?", re.IGNORECASE)
_LETTER_WITH_TEXT = re.compile(r"(?:\(([A-Za-z])\)|([A-Z])[.):])\s*(\S.*)", re.DOTALL)
_OTHER_LETTER_MARK = re.compile(r"\([A-Z]\)|\b[A-Z][.)](?:\s|$)|\b(?:or|and)\s+[A-Z]\b")
_CHOICE_PREFIX = re.compile(r"\(?[A-Za-z][.):]\s+|\([A-Za-z]\)\s*")


def _choice_letter(text: str, choices_key: tuple[str, ...] | None) -> str | None:
    plain = _to_plain(text).strip().strip("\"'`").strip()
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(choices_key)] if choices_key else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for pattern in (_LETTER_ALONE, _LETTER_PHRASE):
        match = pattern.fullmatch(plain)
        if match:
            letter = match.group(1).upper()
            return letter if letter in letters else None
    options = _prepare_choices(choices_key) if choices_key else ()
    match = _LETTER_WITH_TEXT.fullmatch(plain)
    if match:
        letter = (match.group(1) or match.group(2)).upper()
        rest = match.group(3)
        if letter not in letters or _OTHER_LETTER_MARK.search(rest):
            return None
        if options:  # "B. <text>" naming another option's text is a contradiction, not an answer
            rest_view = _make_view(rest)
            index = letters.index(letter)
            if not _views_equal(rest_view, options[index]) and any(
                    _views_equal(rest_view, option) for option in options):
                return None
        return letter
    if options:
        view = _make_view(text)
        found = [letters[i] for i, option in enumerate(options) if _views_equal(view, option)]
        if len(found) == 1:
            return found[0]
    return None


# ---------------------------------------------------------------------------------------------------
# Multi-value answers

_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _split_items(norm: str) -> tuple[list[str], bool, str] | None:
    if "," not in norm and ";" not in norm and " and " not in norm:
        return None
    if _THOUSANDS.fullmatch(norm):
        return None
    body, brackets = norm, ""
    if len(norm) >= 2 and norm[0] in "([{" and norm[-1] in ")]}" and _closing_index(norm) == len(norm) - 1:
        body, brackets = norm[1:-1], norm[0] + norm[-1]
    # "1,234, 5,678": with comma-space present, only comma-space separates (keeps thousands intact)
    spaced = ", " in body or ";" in body
    if not spaced and body.count(",") == len(_THOUSANDS_COMMA.findall(body)) and " and " not in body:
        return None  # "1,234 cm": every comma is a thousands separator
    parts, depth, start, i, n = [], 0, 0, 0, len(body)
    while i < n:
        char = body[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            cut = 0
            if char == ";" or (char == "," and (not spaced or body.startswith(", ", i))):
                cut = 1
            elif char == " " and body.startswith(" and ", i):
                cut = 5
            if cut:
                parts.append(body[start:i])
                i += cut
                start = i
                if len(parts) > _MAX_ITEMS:
                    return None
                continue
        i += 1
    parts.append(body[start:])
    parts = [part.strip() for part in parts]
    if len(parts) < 2 or not all(parts):
        return None
    ordered = brackets in ("()", "[]", "(]", "[)")
    return parts, ordered, brackets


def _closing_index(text: str) -> int:
    """Index of the bracket closing text[0] (any bracket kind, so intervals like (0,1] work)."""
    depth = 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return index
    return -1


# ---------------------------------------------------------------------------------------------------
# Numbers

_PERCENT_SUFFIX = re.compile(r"\s*(?:%|percent|per cent)$")
_UNIT_WORDS = re.compile(r"\s+[a-zµ][a-zµ.]*(?:\^?[23])?(?:/[a-z]+(?:\^?[23])?)?(?:\s+[a-z]+\.?(?:\^?[23])?)?$")
_GLUED_UNIT = re.compile(r"(?<=\d)(?:mm|cm|km|m|kg|mg|g|ms|s|min|h|hr|hrs|ml|l|in|ft|yd|mi|lb|lbs|oz|mph|kmh|"
                         r"km/h|m/s|px|deg|rad)(?:\^?[23])?$")
_CURRENCY_PREFIX = re.compile(r"^(?:[€£¥₹]|usd|rs\.?|≈|~)\s*")
_VARIABLE_PREFIX = re.compile(r"^[^=<>!]{1,24}(?:=|≈)(?!=)\s*")
_LITERAL = re.compile(r"([-+]?)(\d*)(?:\.(\d*))?(?:e([-+]?\d+))?")
_EXPRESSION_CHARS = re.compile(r"[\d.+\-*/^()a-z ]+")
_NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


def _parse_number(norm: str) -> _Number | None:
    if not norm or len(norm) > MAX_ANSWER_CHARS:
        return None
    if len(norm) > 120:  # only a plain literal is that long
        number = _parse_plain_number(norm)
        return _Number((number[0],), *number[1:], False) if number else None
    s = norm
    percent = False
    suffix = _PERCENT_SUFFIX.search(s)
    if suffix:
        percent, s = True, s[:suffix.start()]
    s = _CURRENCY_PREFIX.sub("", s)
    number = _parse_plain_number(s)
    if number is None:
        for strip in (_strip_units, _strip_variable, lambda t: _strip_units(_strip_variable(t))):
            stripped = strip(s)
            if stripped and stripped != s:
                if not percent and _PERCENT_SUFFIX.search(stripped):
                    percent, stripped = True, _PERCENT_SUFFIX.sub("", stripped)
                number = _parse_plain_number(stripped)
                if number is not None:
                    break
    if number is None:
        return None
    value, kind, places, significant = number
    values = (value, value / 100) if percent else (value,)
    return _Number(values, kind, places, significant, percent)


def _strip_units(s: str) -> str:
    stripped = _UNIT_WORDS.sub("", s)
    if stripped == s:
        stripped = _GLUED_UNIT.sub("", s)
    return stripped.strip()


def _strip_variable(s: str) -> str:
    return _VARIABLE_PREFIX.sub("", s).strip()


def _parse_plain_number(s: str):
    """(value, kind, decimal places, significant digits) of a number or closed-form expression."""
    s = s.strip()
    if not s:
        return None
    if s in _NUMBER_WORDS:
        return _NUMBER_WORDS[s], "int", 0, 1
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    literal = _LITERAL.fullmatch(s)
    if literal and (literal.group(2) or literal.group(3)):
        sign, whole, fraction, exponent = literal.groups()
        if len(whole) + len(fraction or "") > _MAX_NUMBER_DIGITS:
            return None
        if fraction is None and exponent is None:
            return int(sign + whole), "int", 0, len(whole.lstrip("0")) or 1
        value = float(s)
        if not math.isfinite(value):  # 1e400: a number, but beyond floats; equal only if spelled equal
            return value, "overflow", 0, 0
        if exponent is not None:
            return value, "sci", 0, 0
        digits = (whole + fraction).lstrip("0")
        return value, "decimal", len(fraction), len(digits)
    if len(s) <= 80 and _EXPRESSION_CHARS.fullmatch(s) and (any(c.isdigit() for c in s) or "pi" in s):
        value = _evaluate(s)
        if value is not None:
            return value, "exact", 0, 0
    return None


# A tiny arithmetic evaluator for closed forms (sqrt(3)/2, 2^10, 3pi/4, (1+sqrt(5))/2): numeric
# answers written symbolically are settled here in microseconds instead of by math-verify.
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:e[-+]?\d+)?|\.\d+(?:e[-+]?\d+)?)|(sqrt|pi)|([-+*/^()]))")


class _Unevaluable(Exception):
    pass


def _evaluate(s: str) -> float | None:
    tokens = []
    i, n = 0, len(s)
    while i < n:
        match = _TOKEN.match(s, i)
        if match is None:
            if s[i:].strip() == "":
                break
            return None
        number, name, op = match.groups()
        tokens.append(("num", float(number)) if number else ("name", name) if name else ("op", op))
        i = match.end()
        if len(tokens) > 64:
            return None
    try:
        value, position = _parse_sum(tokens, 0, 0)
        if position != len(tokens):
            return None
    except (_Unevaluable, OverflowError, ZeroDivisionError, ValueError, TypeError, RecursionError):
        return None
    if isinstance(value, complex) or not math.isfinite(value):
        return None
    return value


def _parse_sum(tokens, i, depth):
    value, i = _parse_product(tokens, i, depth)
    while i < len(tokens) and tokens[i] in (("op", "+"), ("op", "-")):
        right, next_i = _parse_product(tokens, i + 1, depth)
        value = value + right if tokens[i][1] == "+" else value - right
        i = next_i
    return value, i


def _parse_product(tokens, i, depth):
    value, i = _parse_unary(tokens, i, depth)
    while i < len(tokens):
        kind, text = tokens[i]
        if (kind, text) in (("op", "*"), ("op", "/")):
            right, i = _parse_unary(tokens, i + 1, depth)
            value = value * right if text == "*" else value / right
        elif kind in ("num", "name") or (kind, text) == ("op", "("):  # implicit multiplication: 2sqrt(3)
            right, i = _parse_unary(tokens, i, depth)
            value = value * right
        else:
            break
    return value, i


def _parse_unary(tokens, i, depth):
    if i < len(tokens) and tokens[i] in (("op", "-"), ("op", "+")):
        sign = -1 if tokens[i][1] == "-" else 1
        value, i = _parse_unary(tokens, i + 1, depth + 1)
        return sign * value, i
    return _parse_power(tokens, i, depth)


def _parse_power(tokens, i, depth):
    base, i = _parse_primary(tokens, i, depth)
    if i < len(tokens) and tokens[i] == ("op", "^"):
        exponent, i = _parse_unary(tokens, i + 1, depth + 1)
        if abs(exponent) > 1000 or (abs(base) > 1e6 and abs(exponent) > 50):
            raise _Unevaluable
        base = base ** exponent
    return base, i


def _parse_primary(tokens, i, depth):
    if depth > 16 or i >= len(tokens):
        raise _Unevaluable
    kind, text = tokens[i]
    if kind == "num":
        return text, i + 1
    if kind == "name":
        if text == "pi":
            return math.pi, i + 1
        argument, i = _parse_power(tokens, i + 1, depth + 1)  # sqrt(3), sqrt3
        return math.sqrt(argument), i
    if text == "(":
        value, i = _parse_sum(tokens, i + 1, depth + 1)
        if i >= len(tokens) or tokens[i] != ("op", ")"):
            raise _Unevaluable
        return value, i + 1
    raise _Unevaluable


def _numbers_match(pred: _Number, gold: _Number) -> bool:
    both_percent = pred.percent and gold.percent
    pred_values = pred.values[:1] if both_percent else pred.values
    gold_values = gold.values[:1] if both_percent else gold.values
    if pred.kind == "overflow" or gold.kind == "overflow":
        return False
    try:
        return any(_values_close(p, g, pred, gold) for p in pred_values for g in gold_values)
    except OverflowError:  # a 400-digit integer against a float
        return False


def _values_close(p, g, pred: _Number, gold: _Number) -> bool:
    if gold.kind == "int":  # counts and integer answers are exact
        if isinstance(p, int) and isinstance(g, int):
            return p == g
        return math.isclose(p, g, rel_tol=1e-9, abs_tol=1e-9)
    if math.isclose(p, g, rel_tol=REL_TOL, abs_tol=1e-12):
        return True
    return (gold.kind == "exact" and pred.kind == "decimal" and pred.places >= 2 and pred.significant >= 2
            and abs(p - g) <= 0.5 * 10.0 ** -pred.places * (1 + 1e-9))


# ---------------------------------------------------------------------------------------------------
# "Looks mathematical": the gate in front of math-verify

_MATH_MARK = re.compile(r"[\d^=+\-*/<>()\[\]{}|!∪∩∈±]|sqrt|pi|inf")
_WORD = re.compile(r"[a-z]{2,}")
_MATH_WORDS = frozenset({"sqrt", "pi", "inf", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos",
                         "arctan", "log", "ln", "exp", "lim", "max", "min", "theta", "alpha", "beta", "gamma",
                         "delta", "lambda", "mu", "sigma", "phi", "omega", "rho", "tau", "epsilon", "infty",
                         "frac", "mathbb", "emptyset", "varnothing", "le", "ge", "neq", "cdot", "mod", "gcd"})


def _looks_mathematical(norm: str) -> bool:
    if not norm or len(norm) > _MAX_MATH_VERIFY_CHARS or not _MATH_MARK.search(norm):
        return False
    return all(word in _MATH_WORDS for word in _WORD.findall(norm))


# ---------------------------------------------------------------------------------------------------
# math-verify under a timeout
#
# math_verify's own timeouts use signal.alarm, which only works in the main thread (it raises
# ValueError elsewhere). So its timeouts are switched off and we bound it ourselves: in the main
# thread with an interval timer whose exception is a BaseException (so library `except Exception`
# blocks cannot swallow it, and the interval re-fires if something does); in any other thread by
# running it in a helper process that is killed on timeout. Both give up with "no match".

_WORKER_LOCK = threading.Lock()
_worker = None
_log_filter_installed = False
_warmed_up = False


class _MathVerifyTimeout(BaseException):
    pass


class _DropDisabledTimeoutWarning(logging.Filter):
    """math_verify warns once that its timeout is off; here that is intended (we enforce our own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _install_log_filter() -> None:
    global _log_filter_installed
    if not _log_filter_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
        _log_filter_installed = True


def _as_latex(text: str) -> str:
    return text if ("$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text) else f"${text}$"


def _math_verify_compare(pred: str, gold: str) -> bool:
    """math-verify equivalence with its own timeouts off (the caller bounds the time)."""
    from math_verify import parse, verify

    _install_log_filter()
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _math_verify_equal(pred: str, gold: str, timeout_s: float) -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    if timeout_s is None or timeout_s <= 0:
        timeout_s = MATH_VERIFY_TIMEOUT_S
    if (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)):
        return _compare_with_timer(pred, gold, timeout_s)
    return _compare_in_worker(pred, gold, timeout_s)


def _raise_timeout(signum, frame):
    raise _MathVerifyTimeout


def _warm_up() -> None:
    """math-verify imports sympy's LaTeX machinery on first use (seconds on a busy machine): pay that
    outside any timeout, so the first real comparison is not cut short."""
    global _warmed_up
    if not _warmed_up:
        _math_verify_compare("1", "1")
        _warmed_up = True


def _compare_with_timer(pred: str, gold: str, timeout_s: float) -> bool:
    _warm_up()
    previous_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)
            return _math_verify_compare(pred, gold)
        except Exception:
            return False
        finally:
            _disarm_timer()
    except _MathVerifyTimeout:
        return False
    finally:
        _disarm_timer()
        signal.signal(signal.SIGALRM, previous_handler)


def _disarm_timer() -> None:
    while True:  # the alarm may fire while we disarm it: then disarm again
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except _MathVerifyTimeout:
            continue


def _compare_in_worker(pred: str, gold: str, timeout_s: float) -> bool:
    global _worker
    with _WORKER_LOCK:
        try:
            if _worker is None:
                _worker = _MathVerifyWorker()
            return _worker.compare(pred, gold, timeout_s)
        except Exception:
            if _worker is not None:
                _worker.close()
            _worker = None
            return False


class _MathVerifyWorker:
    """A helper process that runs math-verify; killed (and later restarted) when a call overruns.

    A plain subprocess speaking JSON lines, not multiprocessing: spawn would re-import the caller's
    __main__ (scripts without a main guard would run again), and fork is unsafe with threads."""

    def __init__(self):
        project_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = project_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from stages.common.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=project_root)
        self._buffer = b""
        try:
            if self._read_line(_WORKER_START_TIMEOUT_S) != b"ready":
                raise RuntimeError("math-verify worker did not start")
        except BaseException:
            self.close()
            raise

    def compare(self, pred: str, gold: str, timeout_s: float) -> bool:
        self.process.stdin.write(json.dumps([pred, gold]).encode() + b"\n")
        self.process.stdin.flush()
        return self._read_line(timeout_s) == b"1"

    def _read_line(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("math-verify timed out")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        try:
            self.process.kill()
            self.process.wait(5)
            self.process.stdin.close()
            self.process.stdout.close()
        except Exception:
            pass


def _worker_main() -> None:
    """The helper process: one JSON [pred, gold] per stdin line, "1"/"0" per stdout line."""
    import math_verify  # noqa: F401  (imported before "ready" so start-up is not charged to a call)

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the reply stream
    _warm_up()
    replies.write(b"ready\n")
    replies.flush()
    for line in sys.stdin.buffer:
        try:
            pred, gold = json.loads(line)
            result = _math_verify_compare(str(pred), str(gold))
        except Exception:
            result = False
        replies.write(b"1\n" if result else b"0\n")
        replies.flush()
