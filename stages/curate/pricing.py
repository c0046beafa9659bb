"""Token accounting and cost estimates for teacher calls.

Prices are USD per million tokens, as published by the providers when this table was written; they
change, so the table is overridable (`--set prices='{"gemini-3-flash": {"input": 0.5, "output": 3.0}}'`)
and every figure prism prints from it is called an estimate. Thought tokens are billed as output.
A model missing from the table costs 0 and is reported as unpriced. Tokens answered through the Batch API
(a usage dict with "batch": true) are also summed under batch_* keys and billed at BATCH_DISCOUNT.
"""

from __future__ import annotations

import re

DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # Gemini Developer API, standard tier, text/image input (USD per 1M tokens)
    "gemini-3-flash": {"input": 0.50, "output": 3.00},
    "gemini-3-pro": {"input": 2.00, "output": 12.00},
    "gemini-2.5-flash": {"input": 0.30, "output": 2.50},
    "gemini-2.5-flash-lite": {"input": 0.10, "output": 0.40},
    "gemini-2.5-pro": {"input": 1.25, "output": 10.00},
}
BATCH_DISCOUNT = 0.5  # the Batch API bills half

# Gemini counts an image up to 384x384 px as 258 tokens and larger ones as 258 per 768x768 tile.
IMAGE_TOKENS = 258
CHARS_PER_TOKEN = 4


def price_for(model: str, prices: dict | None = None) -> dict | None:
    """The price entry for a model id, matching a versioned id ("gemini-3-flash-preview") by prefix."""
    table = {**DEFAULT_PRICES, **(prices or {})}
    if model in table:
        return table[model]
    best = max((k for k in table if model.startswith(k)), key=len, default=None)
    return table[best] if best else None


def cost(usage: dict, model: str, prices: dict | None = None) -> float:
    p = price_for(model, prices)
    if not p:
        return 0.0
    def standard(prefix: str) -> float:
        out = usage.get(prefix + "output_tokens", 0) + usage.get(prefix + "thought_tokens", 0)
        return (usage.get(prefix + "prompt_tokens", 0) * p.get("input", 0.0) + out * p.get("output", 0.0)) / 1e6

    # a single reply marks itself "batch"; a sum carries its batch share under batch_* keys
    if usage.get("batch") is True:
        return standard("") * BATCH_DISCOUNT
    return standard("") - standard("batch_") * (1.0 - BATCH_DISCOUNT)


def image_tokens(width: int, height: int) -> int:
    if width <= 384 and height <= 384:
        return IMAGE_TOKENS
    return IMAGE_TOKENS * (-(-width // 768)) * (-(-height // 768))


def image_sizes(images: list[bytes]) -> list[tuple[int, int]]:
    """(width, height) of each encoded image from its header alone; an unreadable one counts as one 768 tile."""
    import io

    from PIL import Image

    sizes = []
    for img in images:
        try:
            sizes.append(Image.open(io.BytesIO(img)).size)
        except Exception:
            sizes.append((768, 768))
    return sizes


def estimate_prompt_tokens(text: str, image_sizes: list[tuple[int, int]]) -> int:
    return len(re.sub(r"\s+", " ", text)) // CHARS_PER_TOKEN + 1 + sum(image_tokens(w, h) for w, h in image_sizes)


def add_usage(total: dict, usage: dict) -> dict:
    batch = usage.get("batch") is True
    for k in ("prompt_tokens", "output_tokens", "thought_tokens", "total_tokens"):
        total[k] = total.get(k, 0) + int(usage.get(k, 0) or 0)
        if batch or usage.get("batch_" + k):
            n = int(usage.get(k, 0) or 0) if batch else int(usage.get("batch_" + k) or 0)
            total["batch_" + k] = total.get("batch_" + k, 0) + n
    return total
