"""SFT data: samples -> token ids with an assistant-only label mask -> packed or padded micro-batches.

Encoding happens once, up front (tokenizer + image processor), so a training step only concatenates
tensors. Packing puts a micro-batch's samples in one row with no padding: text positions restart at 0
for every sample, which transformers turns into a block-diagonal causal mask (attention never crosses
samples), and the M-RoPE positions of each sample are computed on that sample alone.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from stages.common.contract.errors import PrismError
from stages.common.contract.samples import Sample
from stages.common.data.chat import sft_messages
from stages.sft import targets

IGNORE = -100


@dataclass
class Encoded:
    input_ids: torch.Tensor                 # [L] long
    label_mask: torch.Tensor                # [L] bool: tokens the loss is on (assistant turns)
    mm_token_type_ids: torch.Tensor         # [L] 0 text, 1 image, 2 video
    rope_positions: torch.Tensor | None     # [3, L] M-RoPE positions of this sample alone
    pixel_values: torch.Tensor | None       # [patches, dim] of this sample's images
    image_grid_thw: torch.Tensor | None     # [images, 3]

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_targets(self) -> int:
        # token t predicts t+1, so the first token is never a target
        return int(self.label_mask[1:].sum())


def _image_blocks(mm_token_type_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of image tokens."""
    is_img = (mm_token_type_ids == 1).tolist()
    blocks, start = [], None
    for i, flag in enumerate(is_img + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            blocks.append((start, i))
            start = None
    return blocks


def truncate(enc: dict, max_length: int) -> tuple[dict, int] | None:
    """Cut a sequence to max_length without ever cutting an image: if the cut falls inside or before an
    image, cut before that image (dropping it and later images). Returns (enc, images kept) or None when
    nothing trainable would remain."""
    ids = enc["input_ids"]
    n_images = 0 if enc.get("image_grid_thw") is None else len(enc["image_grid_thw"])
    if ids.numel() <= max_length:
        return enc, n_images
    cut = max_length
    blocks = _image_blocks(enc["mm_token_type_ids"])
    kept = 0
    for start, end in blocks:
        if end <= cut:
            kept += 1
            continue
        # the image's <|vision_start|> sits just before its first pad token
        cut = min(cut, max(0, start - 1))
        break
    out = {k: v[:cut] for k, v in enc.items() if k in ("input_ids", "assistant_masks", "mm_token_type_ids")}
    if kept < n_images:
        grid = enc["image_grid_thw"][:kept]
        out["image_grid_thw"] = grid if kept else None
        rows = int(grid.prod(-1).sum()) if kept else 0
        out["pixel_values"] = enc["pixel_values"][:rows] if kept else None
    else:
        out["image_grid_thw"] = enc.get("image_grid_thw")
        out["pixel_values"] = enc.get("pixel_values")
    if int(out["assistant_masks"][1:].sum()) == 0:
        return None
    return out, kept


def encode_sample(sample: Sample, processor, rope_index, max_length: int, system_prompt: bool = True
                  ) -> Encoded | str:
    """One sample -> Encoded, or a short reason string when it is skipped."""
    return encode_batch([sample], processor, rope_index, max_length, system_prompt)[0]


def locate_targets(samples: list[Sample], processor, system_prompt: bool, out: list):
    """Render each sample's chat and find its assistant turns' character spans (stages.sft.targets).
    Returns (indices, texts, spans, images of those samples in order); a sample whose target cannot be
    located gets its reason in out[i]."""
    end_tokens = targets.end_of_turn_tokens(processor.tokenizer)

    def render(messages, add_generation_prompt=False):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    todo, texts, spans_of, images = [], [], [], []
    for i, sample in enumerate(samples):
        try:
            pil = sample.pil_images() if sample.images else []
        except PrismError as e:   # an image whose header passed the load checks but whose pixels do not decode
            out[i] = e.message
            continue
        messages = sft_messages(sample, system_prompt, pil or None)
        if messages is None:
            continue
        text = render(messages)
        spans = targets.assistant_spans(render, messages, text, end_tokens)
        if isinstance(spans, str):
            out[i] = spans
            continue
        todo.append(i)
        texts.append(text)
        spans_of.append(spans)
        images.extend(pil)
    return todo, texts, spans_of, images


def encode_batch(samples: list[Sample], processor, rope_index, max_length: int, system_prompt: bool = True
                 ) -> list[Encoded | str]:
    """Samples -> Encoded (or a reason string when skipped), image-processed in one processor call.

    The label mask comes from stages.sft.targets (the rendered text and its token offsets), not from
    {% generation %} markers, so it is exact for any chat template."""
    out: list[Encoded | str] = ["no target (no teacher demonstration or conversation)"] * len(samples)
    tok = processor.tokenizer
    todo, texts, spans_of, images = locate_targets(samples, processor, system_prompt, out)
    if not todo:
        return out
    plain = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    masks = [(ids, targets.token_mask(offsets, spans))
             for ids, offsets, spans in zip(plain["input_ids"], plain["offset_mapping"], spans_of)]
    enc = processor(text=texts, images=images or None, padding=False, return_mm_token_type_ids=True)
    grid = enc.get("image_grid_thw")
    grid = torch.as_tensor(grid) if grid is not None else None
    pixel_values = torch.as_tensor(enc["pixel_values"]) if enc.get("pixel_values") is not None else None
    images_per_row = [len(samples[i].images) for i in todo]
    patch_rows = grid.prod(-1).tolist() if grid is not None else []
    merge = getattr(processor.image_processor, "merge_size", 1) or 1
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    image_at = [0]
    for n in images_per_row:
        image_at.append(image_at[-1] + n)
    patch_at = [0]
    for n in patch_rows:
        patch_at.append(patch_at[-1] + n)
    for row, i in enumerate(todo):
        ids_list = list(enc["input_ids"][row])
        lo, hi = image_at[row], image_at[row + 1]
        mask = targets.expand_placeholders(*masks[row], ids_list, image_token_id,
                                           [n // (merge * merge) for n in patch_rows[lo:hi]])
        if mask is None:
            out[i] = "the processor's tokens do not match the tokenizer's on the rendered chat"
            continue
        ids = torch.tensor(ids_list, dtype=torch.long)
        one = {
            "input_ids": ids,
            "assistant_masks": torch.tensor(mask, dtype=torch.bool),
            "mm_token_type_ids": torch.tensor(enc["mm_token_type_ids"][row], dtype=torch.long)
            if "mm_token_type_ids" in enc else (ids == image_token_id).long(),
            "pixel_values": pixel_values[patch_at[lo]:patch_at[hi]] if hi > lo else None,
            "image_grid_thw": grid[lo:hi] if hi > lo else None,
        }
        if int(one["assistant_masks"][1:].sum()) == 0:
            out[i] = "no target token (empty assistant turn)"
            continue
        cut = truncate(one, max_length)
        if cut is None:
            out[i] = "prompt longer than max_length"
            continue
        one, _ = cut
        rope = None
        if rope_index is not None:
            rope = rope_index(one["input_ids"][None], one["mm_token_type_ids"][None], one["image_grid_thw"])[:, 0]
        out[i] = Encoded(input_ids=one["input_ids"], label_mask=one["assistant_masks"],
                         mm_token_type_ids=one["mm_token_type_ids"], rope_positions=rope,
                         pixel_values=one["pixel_values"], image_grid_thw=one["image_grid_thw"])
    return out


def rope_index_of(model):
    """The model's M-RoPE position function (Qwen-VL family), wrapped to return [3, B, L]."""
    inner = getattr(getattr(model, "module", model), "model", None)
    fn = getattr(inner, "get_rope_index", None)
    if fn is None:
        return None

    def rope_index(input_ids, mm_token_type_ids, image_grid_thw):
        with torch.no_grad():
            pos, _ = fn(input_ids=input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw)
        return pos

    return rope_index


def _cat_images(items: list[Encoded]):
    pv = [e.pixel_values for e in items if e.pixel_values is not None]
    grid = [e.image_grid_thw for e in items if e.image_grid_thw is not None]
    return (torch.cat(pv) if pv else None), (torch.cat(grid) if grid else None)


def pack(items: list[Encoded]) -> dict:
    """One padding-free row: model inputs plus `targets` [1, L] (IGNORE where no loss).

    position_ids is [4, 1, L]: row 0 the text positions (restarting per sample, which is how
    transformers detects the packed samples and builds their block-diagonal mask), rows 1-3 M-RoPE."""
    ids = torch.cat([e.input_ids for e in items])
    targets = torch.cat([_targets(e) for e in items])
    text_pos = torch.cat([torch.arange(e.n_tokens) for e in items])
    if all(e.rope_positions is not None for e in items):
        rope = torch.cat([e.rope_positions for e in items], dim=1)
        position_ids = torch.cat([text_pos[None], rope]).unsqueeze(1)
    else:
        position_ids = text_pos.view(1, 1, -1).expand(4, 1, -1)
    pixel_values, grid = _cat_images(items)
    batch = {"input_ids": ids[None], "position_ids": position_ids, "attention_mask": None,
             "mm_token_type_ids": torch.cat([e.mm_token_type_ids for e in items])[None], "targets": targets[None]}
    if pixel_values is not None:
        batch.update(pixel_values=pixel_values, image_grid_thw=grid)
    return batch


def pad(items: list[Encoded], pad_id: int) -> dict:
    """A right-padded batch (used when packing is off, e.g. for attention backends without packing).

    No attention mask: with right padding every pad key comes after every real query of its row, so the
    causal mask alone already keeps real tokens off the pads (the pads' own outputs carry no loss). Without
    a padding mask sdpa runs its causal kernel, ~6% faster a step on the tiny model."""
    length = max(e.n_tokens for e in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    targets = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mm = torch.zeros((len(items), length), dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, :e.n_tokens] = e.input_ids
        targets[i, :e.n_tokens] = _targets(e)
        mm[i, :e.n_tokens] = e.mm_token_type_ids
    pixel_values, grid = _cat_images(items)
    batch = {"input_ids": ids, "attention_mask": None, "mm_token_type_ids": mm, "targets": targets}
    if pixel_values is not None:
        batch.update(pixel_values=pixel_values, image_grid_thw=grid)
    return batch


def _targets(e: Encoded) -> torch.Tensor:
    """targets[t] = the token position t must predict (input_ids[t+1]) where t+1 is a label, else IGNORE."""
    t = torch.full_like(e.input_ids, IGNORE)
    nxt = e.input_ids[1:]
    t[:-1] = torch.where(e.label_mask[1:], nxt, torch.full_like(nxt, IGNORE))
    return t


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), so resume replays it.
    Cached: a step only slices it (reshuffling 1M indices per step would cost ~1 s)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def step_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Global sample indices of one optimizer step (partial batches at an epoch's end are dropped)."""
    steps_per_epoch = n // batch_size
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(n, seed, epoch)
    return list(order[within * batch_size:(within + 1) * batch_size])


def split_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A deterministic held-out split by sample id (stable when the data order changes)."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    ranked = sorted(samples, key=lambda s: hash_unit(f"{seed}:{s.id}"))
    n_eval = max(1, int(round(fraction * len(samples))))
    held = {s.id for s in ranked[:n_eval]}
    return [s for s in samples if s.id not in held], [s for s in samples if s.id in held]


def hash_unit(text: str) -> float:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
