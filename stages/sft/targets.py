"""Assistant-only label masks for any chat template, without {% generation %} markers.

transformers' `return_assistant_tokens_mask` needs the template to wrap assistant turns in
{% generation %} markers; the stock Qwen3-VL and Qwen2.5-VL templates have none, and the mask then comes
back all zeros with only a warning (training on nothing). Here the mask comes from the rendered text
itself:

1. render the conversation with the model's own template (text, one placeholder per image);
2. find each assistant turn's characters: its content, searched from where the template's rendering of the
   conversation before it (with the generation prompt opened) ends, through the end-of-turn token that
   closes it (`<|im_end|>` for Qwen); only whitespace may lie between the content and that token;
3. tokenise the text with offsets: a token is a target when its characters overlap a turn's span, so a
   tag split into BPE pieces, or a `>` merged with the next newline, is handled like any other text;
4. expand the mask to the processor's tokens: each image placeholder becomes that image's run of
   placeholder tokens (never targets); every other token must match one to one.

A turn that cannot be located (a template that rewrites the content, or closes turns with no known end
token) refuses the sample with the reason; nothing is guessed.
"""

from __future__ import annotations

import bisect

Span = tuple[int, int]
QWEN_END_OF_TURN = "<|im_end|>"


def message_text(message: dict) -> str:
    """The text a template renders for a message's content (a string, or the text parts in order)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and "text" in part)


def end_of_turn_tokens(tokenizer) -> list[str]:
    """Tokens that can close an assistant turn: the tokenizer's eos, and Qwen's <|im_end|> when it exists."""
    out = []
    for token in (getattr(tokenizer, "eos_token", None), QWEN_END_OF_TURN):
        if not token or token in out:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != getattr(tokenizer, "unk_token_id", None):
            out.append(token)
    return out


def assistant_spans(render, messages: list[dict], text: str, end_tokens: list[str]) -> list[Span] | str:
    """Character spans [start, end) of every assistant turn's content plus its end-of-turn token in `text`
    (the full rendering), or a reason string. `render(messages, add_generation_prompt)` renders a prefix."""
    spans: list[Span] = []
    cursor, turn = 0, 0
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        turn += 1
        lower = cursor
        if k > 0:
            prefix = render(messages[:k], True)
            if text.startswith(prefix):
                lower = max(lower, len(prefix))
        content = message_text(message)
        start = text.find(content, lower) if content else lower
        if start < 0:
            return f"assistant turn {turn} does not appear verbatim in the chat template's output"
        after = start + len(content)
        closes = [(text.find(t, after), t) for t in end_tokens]
        closes = [(at, t) for at, t in closes if at >= 0 and not text[after:at].strip()]
        if not closes:
            return (f"assistant turn {turn} is not closed by {' or '.join(end_tokens) or 'an end token'} "
                    "in the chat template's output")
        at, token = min(closes)
        spans.append((start, at + len(token)))
        cursor = at + len(token)
    if not spans:
        return "no assistant turn"
    return spans


def token_mask(offsets: list[tuple[int, int]], spans: list[Span]) -> list[bool]:
    """True for each token whose characters overlap a span. Offsets of one tokenised text never go backwards,
    so the tokens of a span are one contiguous range, found by bisection; zero-width tokens are never in it."""
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    mask = [False] * len(offsets)
    for span_start, span_end in spans:
        first = bisect.bisect_right(ends, span_start)   # first token ending after the span starts
        last = bisect.bisect_left(starts, span_end)     # first token starting at or after the span's end
        for i in range(first, last):
            mask[i] = ends[i] > starts[i]
    return mask


def expand_placeholders(text_ids: list[int], text_mask: list[bool], ids: list[int], placeholder_id: int,
                        run_lengths: list[int]) -> list[bool] | None:
    """The mask of `text_ids` carried over to `ids`, where the q-th `placeholder_id` of text_ids became
    run_lengths[q] copies. None when the two sequences do not correspond."""
    out: list[bool] = []
    j, q = 0, 0
    for tid, flag in zip(text_ids, text_mask):
        if tid == placeholder_id:
            if q >= len(run_lengths):
                return None
            n = run_lengths[q]
            q += 1
            if ids[j:j + n] != [tid] * n:
                return None
            out.extend([flag] * n)
            j += n
        else:
            if j >= len(ids) or ids[j] != tid:
                return None
            out.append(flag)
            j += 1
    return out if j == len(ids) and q == len(run_lengths) else None
