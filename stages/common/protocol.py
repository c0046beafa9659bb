"""The <caption><think><answer> response protocol (docs/method.md).

A response is format-valid iff the whole text matches, in order,

    \\s*<caption>(.*?)</caption>\\s*<think>(.*?)</think>\\s*<answer>(.*?)</answer>\\s*

(DOTALL, non-greedy), exactly the authors' rule. `parse_response` decides that with a linear scan
instead of the regex: on tag soup ("</caption>" many times) the backtracking regex is polynomial in
the number of tags, and responses come from a policy that can emit anything. The scan gives the same
verdict and the same segments as the regex (tests check it against the regex on random tag soup).

Invalid responses still yield best-effort segments (first closed caption block, first closed think
block after it, last closed answer block) so rewards and the discriminator can use them.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

SEGMENTS = ("caption", "think", "answer")

SYSTEM_PROMPT = (
    "Look at the image and answer the question. Reply in exactly this format and nothing else:\n"
    "<caption> bullet points describing the image style, key objects and any text </caption>\n"
    "<think> step-by-step reasoning </think>\n"
    "<answer> final answer only </answer>"
)

_OPEN = {name: f"<{name}>" for name in SEGMENTS}
_CLOSE = {name: f"</{name}>" for name in SEGMENTS}
# The two joints of a valid response; \s is Unicode whitespace, as in the reference regex.
_CAPTION_TO_THINK = re.compile(r"</caption>\s*<think>")
_THINK_TO_ANSWER = re.compile(r"</think>\s*<answer>")

Span = tuple[int, int]


@dataclass(frozen=True)
class ParsedResponse:
    """Segments of one response. Contents are stripped; spans index the original text so that
    text[start:end] == content."""

    caption: str | None = None
    think: str | None = None
    answer: str | None = None
    format_ok: bool = False
    spans: dict[str, Span | None] = field(default_factory=lambda: dict.fromkeys(SEGMENTS))


def format_response(caption: str, think: str, answer: str) -> str:
    """The canonical protocol text (teacher demonstrations, SFT targets)."""
    return (f"<caption>\n{str(caption).strip()}\n</caption>\n<think>\n{str(think).strip()}\n</think>\n"
            f"<answer>{str(answer).strip()}</answer>")


def parse_response(text: object) -> ParsedResponse:
    """Split a response into its segments and decide format validity. Never raises."""
    if not isinstance(text, str):
        return ParsedResponse()
    try:
        raw_spans = _valid_spans(text)
        format_ok = raw_spans is not None
        if raw_spans is None:
            raw_spans = _best_effort_spans(text)
    except Exception:  # defensive: a parser bug must not take down a rollout
        return ParsedResponse()
    spans = {name: _strip_span(text, span) for name, span in raw_spans.items()}
    contents = {name: (text[s[0]:s[1]] if s is not None else None) for name, s in spans.items()}
    return ParsedResponse(caption=contents["caption"], think=contents["think"], answer=contents["answer"],
                          format_ok=format_ok, spans=spans)


def _valid_spans(text: str) -> dict[str, Span | None] | None:
    """Raw content spans if the whole text matches the protocol regex, else None.

    Choosing the earliest caption->think joint, then the earliest think->answer joint after it, is
    what the non-greedy regex does, and it is also the choice that leaves the most room, so it finds a
    match whenever one exists."""
    start = len(text) - len(text.lstrip())
    end = len(text.rstrip())
    if not text.startswith(_OPEN["caption"], start) or not text.endswith(_CLOSE["answer"], 0, end):
        return None
    caption_start = start + len(_OPEN["caption"])
    answer_end = end - len(_CLOSE["answer"])
    joint1 = _CAPTION_TO_THINK.search(text, caption_start)
    if joint1 is None:
        return None
    joint2 = _THINK_TO_ANSWER.search(text, joint1.end())
    if joint2 is None or joint2.end() > answer_end:
        return None
    return {"caption": (caption_start, joint1.start()), "think": (joint1.end(), joint2.start()),
            "answer": (joint2.end(), answer_end)}


def _best_effort_spans(text: str) -> dict[str, Span | None]:
    caption = _first_block(text, "caption", 0)
    think = _first_block(text, "think", caption[1] + len(_CLOSE["caption"]) if caption else 0)
    return {"caption": caption, "think": think, "answer": _last_block(text, "answer")}


def _first_block(text: str, name: str, from_pos: int) -> Span | None:
    open_at = text.find(_OPEN[name], from_pos)
    if open_at < 0:
        return None
    content_start = open_at + len(_OPEN[name])
    close_at = text.find(_CLOSE[name], content_start)
    return (content_start, close_at) if close_at >= 0 else None


def _last_block(text: str, name: str) -> Span | None:
    close_at = text.rfind(_CLOSE[name])
    if close_at < 0:
        return None
    open_at = text.rfind(_OPEN[name], 0, close_at)
    return (open_at + len(_OPEN[name]), close_at) if open_at >= 0 else None


def _strip_span(text: str, span: Span | None) -> Span | None:
    """Shrink a raw content span to its stripped content (same whitespace rule as str.strip)."""
    if span is None:
        return None
    start, end = span
    raw = text[start:end]
    stripped_left = raw.lstrip()
    if not stripped_left:
        return (start, start)
    start += len(raw) - len(stripped_left)
    end -= len(raw) - len(raw.rstrip())
    return (start, end)


def token_spans(spans: dict[str, Span | None], offsets) -> dict[str, Span | None]:
    """Map character spans to token ranges [start_tok, end_tok) using a tokenizer's offset_mapping.

    A token belongs to a segment if its characters overlap the segment's span. Zero-width tokens
    (special tokens often report (0, 0)) belong to nothing. An empty segment maps to an empty range
    at the first token that ends after its position. O(n_tokens) to index, O(log n_tokens) per span."""
    if hasattr(offsets, "tolist"):  # tensors / arrays of shape [n, 2]
        offsets = offsets.tolist()
    token_ids, starts, ends = [], [], []
    for index, (char_start, char_end) in enumerate(offsets):
        if char_end > char_start:
            token_ids.append(index)
            starts.append(char_start)
            ends.append(char_end)
    result: dict[str, Span | None] = {}
    for name, span in spans.items():
        if span is None:
            result[name] = None
            continue
        char_start, char_end = span
        first = bisect.bisect_right(ends, char_start)  # first token ending after the span starts
        last = bisect.bisect_left(starts, char_end)  # first token starting at/after the span ends
        if char_end <= char_start or first >= last:
            at = token_ids[first] if first < len(token_ids) else len(offsets)
            result[name] = (at, at)
        else:
            result[name] = (token_ids[first], token_ids[last - 1] + 1)
    return result
