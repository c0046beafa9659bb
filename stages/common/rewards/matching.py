"""Answer matching by cheap rules: the accepted targets, answer views (normalised text, number, multi-value
items), multiple-choice letters, multi-value splitting, and the "looks mathematical" gate in front of
math-verify. `cheap_verdict` says True / False when a rule decides and None when only math-verify could."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from stages.common.rewards.latex import MAX_ANSWER_CHARS, _last_boxed, _to_plain, normalize_answer
from stages.common.rewards.numbers import _THOUSANDS, _Number, _numbers_match, _parse_number

_MAX_ITEMS = 64
MAX_MATH_VERIFY_CHARS = 300


# ---------------------------------------------------------------------------------------------------
# Inputs


def target_texts(ground_truth, equivalents) -> list[str]:
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


def hashable_choices(choices) -> tuple[str, ...] | None:
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


def lenient_answer(text: str) -> str:
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


_ANSWER_PHRASE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------
# Views: an answer prepared for comparison


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


def make_view(raw: str, depth: int = 0) -> _View:
    norm = normalize_answer(raw)
    split = _split_items(norm) if depth < 3 else None
    if split is not None:
        texts, ordered, brackets = split
        items = tuple(make_view(text, depth + 1) for text in texts)
        return _View(raw, norm, None, items, ordered, brackets, _looks_mathematical(norm))
    return _View(raw, norm, _parse_number(norm), None, False, "", _looks_mathematical(norm))


@functools.lru_cache(maxsize=8192)
def prepare_target(text: str, choices_key: tuple[str, ...] | None) -> _Target:
    """Ground truths repeat across a group's rollouts: prepare each once."""
    return _Target(make_view(text), choice_letter(text, choices_key) if len(text) <= MAX_ANSWER_CHARS else None)


@functools.lru_cache(maxsize=1024)
def prepare_choices(choices_key: tuple[str, ...]) -> tuple[_View, ...]:
    return tuple(make_view(_CHOICE_PREFIX.sub("", option.strip(), count=1)) for option in choices_key)


def cheap_verdict(pred: str, pred_view: _View, target: _Target, choices_key) -> bool | None:
    """True / False when a cheap rule decides, None when only math-verify could."""
    gold = target.view
    if pred == gold.raw or (pred_view.norm and pred_view.norm == gold.norm):
        return True
    if target.letter is not None:
        return choice_letter(pred, choices_key) == target.letter
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


def choice_letter(text: str, choices_key: tuple[str, ...] | None) -> str | None:
    plain = _to_plain(text).strip().strip("\"'`").strip()
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(choices_key)] if choices_key else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for pattern in (_LETTER_ALONE, _LETTER_PHRASE):
        match = pattern.fullmatch(plain)
        if match:
            letter = match.group(1).upper()
            return letter if letter in letters else None
    options = prepare_choices(choices_key) if choices_key else ()
    match = _LETTER_WITH_TEXT.fullmatch(plain)
    if match:
        letter = (match.group(1) or match.group(2)).upper()
        rest = match.group(3)
        if letter not in letters or _OTHER_LETTER_MARK.search(rest):
            return None
        if options:  # "B. <text>" naming another option's text is a contradiction, not an answer
            rest_view = make_view(rest)
            index = letters.index(letter)
            if not _views_equal(rest_view, options[index]) and any(
                    _views_equal(rest_view, option) for option in options):
                return None
        return letter
    if options:
        view = make_view(text)
        found = [letters[i] for i, option in enumerate(options) if _views_equal(view, option)]
        if len(found) == 1:
            return found[0]
    return None


# ---------------------------------------------------------------------------------------------------
# Multi-value answers

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
# "Looks mathematical": the gate in front of math-verify

_MATH_MARK = re.compile(r"[\d^=+\-*/<>()\[\]{}|!∪∩∈±]|sqrt|pi|inf")
_WORD = re.compile(r"[a-z]{2,}")
_MATH_WORDS = frozenset({"sqrt", "pi", "inf", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos",
                         "arctan", "log", "ln", "exp", "lim", "max", "min", "theta", "alpha", "beta", "gamma",
                         "delta", "lambda", "mu", "sigma", "phi", "omega", "rho", "tau", "epsilon", "infty",
                         "frac", "mathbb", "emptyset", "varnothing", "le", "ge", "neq", "cdot", "mod", "gcd"})


def _looks_mathematical(norm: str) -> bool:
    if not norm or len(norm) > MAX_MATH_VERIFY_CHARS or not _MATH_MARK.search(norm):
        return False
    return all(word in _MATH_WORDS for word in _WORD.findall(norm))
