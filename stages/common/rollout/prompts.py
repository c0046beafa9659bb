"""RolloutPrompt -> what the processor and the model eat: chat-templated text, images, token tensors.

Shared by the hf engine (left-padded prompt batches), the vllm engine (prompt text + PIL images) and
logprob recomputation (unpadded prompt ids that responses are appended to), so all three see the same
prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stages.common.contract.errors import PrismError
from stages.common.rollout.base import RolloutPrompt

# Tokens that only the processor may place (image/video placeholders and their brackets). A sampled one
# breaks the next forward ("Image features and image tokens do not match"), so sampling never emits them.
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def vision_token_ids(processor) -> list[int]:
    """Ids of the vision special tokens this tokenizer knows (unknown ones are skipped)."""
    tok = tokenizer_of(processor)
    ids = []
    for t in VISION_SPECIAL_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        if i is not None and i != tok.unk_token_id and i not in ids:
            ids.append(int(i))
    return ids


def stop_token_ids(processor, model=None) -> list[int]:
    """EOS ids: the tokenizer's eos plus the model's generation_config eos (Qwen lists <|im_end|> and
    <|endoftext|>)."""
    ids = []
    eos = tokenizer_of(processor).eos_token_id
    if eos is not None:
        ids.append(int(eos))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])):
        if int(i) not in ids:
            ids.append(int(i))
    return ids


def count_image_parts(messages: list[dict]) -> int:
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for part in content if isinstance(part, dict) and (part.get("type") == "image" or "image" in part))
    return n


def prompt_text(processor, prompt: RolloutPrompt) -> str:
    """The chat-templated prompt, ending with the assistant turn's opening (add_generation_prompt)."""
    n_parts = count_image_parts(prompt.messages)
    if n_parts != len(prompt.images):
        raise PrismError(f"a prompt has {n_parts} image part(s) in its messages but {len(prompt.images)} image(s)",
                         hint="put one {'type': 'image'} content part per image, in order")
    return processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(processor, prompts: Sequence[RolloutPrompt], padding_side: str = "left") -> dict:
    """One padded batch of prompts: input_ids, attention_mask, mm_token_type_ids and, when any prompt has
    images, pixel_values + image_grid_thw (images in row order, as the model consumes them)."""
    texts = [prompt_text(processor, p) for p in prompts]
    images = [img for p in prompts for img in p.images]
    tok = tokenizer_of(processor)
    old_side = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = processor(text=texts, images=images or None, padding=True, return_tensors="pt",
                        return_mm_token_type_ids=True)
    finally:
        tok.padding_side = old_side
    out = dict(enc)
    if "mm_token_type_ids" not in out:  # processors that don't emit it: mark image placeholders ourselves
        image_id = tok.convert_tokens_to_ids("<|image_pad|>")
        out["mm_token_type_ids"] = (out["input_ids"] == image_id).int()
    return out


def image_patch_counts(prompts: Sequence[RolloutPrompt], image_grid_thw: torch.Tensor | None) -> list[int]:
    """Rows of pixel_values that belong to each prompt (pixel_values is the concatenation over images)."""
    if image_grid_thw is None:
        return [0] * len(prompts)
    per_image = image_grid_thw.prod(-1).tolist()
    counts, k = [], 0
    for p in prompts:
        counts.append(int(sum(per_image[k:k + len(p.images)])))
        k += len(p.images)
    return counts


def prompt_positions(model, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions for a left-padded prompt batch as the model takes them: [4, B, L] (row 0 the text
    position, rows 1-3 M-RoPE t/h/w), and each row's rope delta [B, 1] (M-RoPE position minus text position
    for every later token)."""
    mask = enc["attention_mask"]
    text_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    inner = getattr(model, "model", model)
    if enc.get("image_grid_thw") is not None and hasattr(inner, "get_rope_index"):
        mrope, deltas = inner.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                             image_grid_thw=enc["image_grid_thw"], attention_mask=mask)
    else:
        mrope = text_pos.unsqueeze(0).expand(3, -1, -1)
        deltas = torch.zeros(mask.shape[0], 1, dtype=torch.long, device=mask.device)
    # get_rope_index counts from the first real token; the text row must agree with it for later steps.
    deltas = deltas.view(-1, 1).to(mask.device)
    return torch.cat([text_pos.unsqueeze(0), mrope.to(text_pos.dtype)], 0), deltas


def banned_token_mask(vocab_size: int, banned_ids: Sequence[int], device=None) -> torch.Tensor:
    """[vocab] bool, True at the token ids sampling must never emit (the vision tokens, vision_token_ids)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids = [int(i) for i in banned_ids if 0 <= int(i) < vocab_size]
    if ids:
        mask[ids] = True
    return mask


# A prompt the processor refuses (an image it cannot resize, one that would not decode) is rolled out as a
# stand-in: the same messages with each image replaced by this plain one, which every processor accepts.
# The stand-in keeps the batch's shape, so every process runs the same forwards and collectives (under
# sharded parameters the vision tower's forward is one); its completions are never scored or trained.
STAND_IN_SIZE = 64


def stand_in(prompt: RolloutPrompt, n_images: int | None = None) -> RolloutPrompt:
    from PIL import Image

    count = len(prompt.images) if n_images is None else n_images
    return RolloutPrompt(messages=prompt.messages,
                         images=[Image.new("RGB", (STAND_IN_SIZE, STAND_IN_SIZE), (128, 128, 128))] * count)


def refusal(processor, prompt: RolloutPrompt) -> str | None:
    """Why the processor refuses this prompt's images (its one-line message), or None when it accepts them."""
    if not prompt.images:
        return None
    try:
        processor.image_processor(images=list(prompt.images), return_tensors="pt")
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # transformers' own message, e.g. the aspect ratio
        return (str(e).splitlines() or [e.__class__.__name__])[0][:200]
    return None


def screen(processor, prompts: Sequence[RolloutPrompt], refused: dict[int, str] | None = None
           ) -> tuple[list[RolloutPrompt], dict[int, str]]:
    """(prompts with a stand-in for each refused one, {index: reason}). One processor call for the batch; only
    when it fails is each prompt tried alone. `refused` holds reasons already known (an image that did not
    decode), whose prompts are stand-ins already."""
    refused = dict(refused or {})
    images = [img for i, p in enumerate(prompts) if i not in refused for img in p.images]
    if images and refusal(processor, RolloutPrompt(messages=[], images=images)) is not None:
        for i, p in enumerate(prompts):
            reason = None if i in refused else refusal(processor, p)
            if reason is not None:
                refused[i] = reason
    return [stand_in(p) if i in refused else p for i, p in enumerate(prompts)], refused
