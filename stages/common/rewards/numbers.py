"""Numbers in answers: literals, fractions, percents, units and currency stripped, and a small arithmetic parser
(+ - * / ^, sqrt, pi) that evaluates an expression without eval(); values compare with the rules of the
rewards package docstring (exact integers, relative tolerance, rounded decimals of exact values)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from stages.common.rewards.latex import MAX_ANSWER_CHARS

REL_TOL = 1e-4
_MAX_NUMBER_DIGITS = 4000  # Python refuses int() beyond 4300 digits
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@dataclass(frozen=True)
class _Number:
    values: tuple  # the value, and for a percent also value / 100
    kind: str  # "int" (exact integer literal), "decimal", "sci", "exact" (fraction / expression), "overflow"
    places: int  # decimal places of a decimal literal
    significant: int  # significant digits of a decimal literal
    percent: bool


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
