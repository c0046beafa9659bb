"""LaTeX and answer-text normalisation: `normalize_answer` turns \\frac{a}{b}, \\sqrt{x}, \\text{...}, spacing and
"answer:" prefixes into one canonical plain-text form for equality."""

from __future__ import annotations

import re
import unicodedata

MAX_ANSWER_CHARS = 2000
_MAX_LATEX_DEPTH = 48


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
