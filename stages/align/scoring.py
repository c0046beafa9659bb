"""Discriminator scoring per segment, and the model side of the discriminator warmup.

A response is scored twice: prompt + caption (perception) and prompt + think (reasoning). Each input is
the prompt as the chat template renders it (images included, generation prompt opened) followed by the
segment as a complete assistant turn, `segment<|im_end|>`; the score is the value head at that closing
<|im_end|>, the segment's last token. Reading it at a terminal token that every segment has makes an
empty segment well defined: it is scored at the <|im_end|> straight after the prompt (a format-invalid
rollout with no caption gets a score there; the align stage leaves such rollouts out of the loss).
Segment text is tokenised with special tokens split, so a rollout that writes "<|image_pad|>" as text
cannot inject a vision placeholder.

Three layouts give the same scores (to float rounding):

  separate  the authors' layout: one full sequence per (prompt, segment), right-padded into a batch;
            the model builds its own causal mask and M-RoPE positions.
  shared    one sequence per prompt group: the prompt (its images encoded once), then every segment of
            the group one after another. A 4-D additive mask lets the prompt attend causally to itself
            and each segment to the whole prompt and causally to itself, never to another segment.
            Position ids are M-RoPE ids [3, B, T]: the prompt's from the backbone's get_rope_index
            (vision tokens get their temporal/height/width grid positions), and each segment restarts at
            the prompt's max position + 1 on all three axes -- what the segment gets as a separate
            sequence. The prompt is processed once instead of 2(n+1) times.
  prefix    the prompts once, left-padded, into a KV cache (pass 1); then every segment packed into rows as
            wide as the longest segment (longest first, each into the first row it fits), each row reading
            its prompt's cache (pass 2). A 4-D mask [rows, 1, W, P + W] lets a segment see its prompt's real
            tokens and causally itself; positions restart as in shared. Attention is W x (P + W) per row
            instead of the group row squared. The router aux loss is taken over both passes' real tokens:
            the shared row's tokens. Needs the discriminator without gradient checkpointing, under which
            transformers drops the KV cache (refused, never silently wrong).

The mask is a float [B, 1, T, T] tensor (0 = attend, dtype-min = blocked): transformers 5.23's
create_causal_mask returns any 4-D mask as is, and both sdpa and eager add it to the attention logits
(flash_attention_2 cannot take it, hence the discriminator's sdpa default). Rows of padding attend to
themselves only, so no softmax row is empty.

`score_segments` / `score_groups` return raw scores (float32); `clip_scores` is the [-10, 10] clip the
discriminator loss applies. `warmup_step` / `pairwise_accuracy` are the Bradley-Terry warmup on
(teacher, student) pairs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from stages.align.config import DISC_LAYOUTS
from stages.align.objective import GroupScores, discriminator_objective
from stages.common.models.discriminator import aux_loss_coef, is_text_only

LAYOUTS = tuple(layout for layout in DISC_LAYOUTS if layout != "auto")   # the options' list, less auto
SCORE_CLIP = 10.0
END_TOKEN = "<|im_end|>"
_PAD_BLOCK = -2     # block id of padding tokens
_PROMPT_BLOCK = -1  # block id of prompt tokens; segments are 0, 1, ...


def clip_scores(scores: torch.Tensor, bound: float = SCORE_CLIP) -> torch.Tensor:
    """Scores clipped to [-bound, bound] (the discriminator loss's clip; docs/method.md)."""
    return scores.clamp(-bound, bound)


# ------------------------------------------------------------------------------------------ encoding

@dataclass
class EncodedPrompt:
    """A prompt tokenised once: ids and modality types [P]; pixels and grids of its images (or None)."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def strip_images(messages: list[dict]) -> list[dict]:
    """The messages without their image parts (the text-only discriminator's view of a prompt)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [part for part in content
                       if not (isinstance(part, dict) and (part.get("type") == "image" or "image" in part))]
        out.append({**message, "content": content})
    return out


def encode_prompt(processor, prompt: Any, text_only: bool = False) -> EncodedPrompt:
    """Tokenise a RolloutPrompt-like object (`.messages`, `.images`) with its images, generation prompt opened."""
    messages, images = prompt.messages, list(getattr(prompt, "images", None) or [])
    if text_only:
        messages, images = strip_images(messages), []
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=images or None, return_tensors="pt")
    input_ids = batch["input_ids"][0]
    mm_types = batch.get("mm_token_type_ids")
    if mm_types is None:  # processors that do not return it: image placeholders are type 1
        image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        mm_types = (batch["input_ids"] == image_token_id).long()
    return EncodedPrompt(input_ids=input_ids, mm_token_type_ids=mm_types[0].long(),
                         pixel_values=batch.get("pixel_values") if images else None,
                         image_grid_thw=batch.get("image_grid_thw") if images else None)


def encode_segment(tokenizer, text: str | None, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text<|im_end|>` (module docstring); None or "" gives just the end token.
    max_tokens caps the text part (the end token is always kept)."""
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    if end_id is None or end_id == getattr(tokenizer, "unk_token_id", None):
        end_id = tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return list(ids) + [end_id]


# ------------------------------------------------------------------------------------------ scoring

@dataclass
class ScoreResult:
    """scores: one float32 tensor per prompt group (in segment order). aux_loss: the router aux loss of
    the forward (MoE with output_router_logits), unscaled. num_tokens: real tokens run through the
    backbone; num_padded_tokens: batch rows x row length; num_chunks: forwards this process ran for them
    (without the repeats that match another process's count)."""

    scores: list[torch.Tensor]
    aux_loss: torch.Tensor | None = None
    num_tokens: int = 0
    num_padded_tokens: int = 0
    num_rows: int = 0
    num_chunks: int = 1
    replay: "_Replay | None" = None

    @property
    def flat(self) -> torch.Tensor:
        return torch.cat(self.scores) if self.scores else torch.zeros(0)

    def backward(self, loss: torch.Tensor, trained=None) -> None:
        """Backpropagate `loss` (a function of these scores and aux_loss) into the discriminator, as one
        optimizer step's gradient. trained: a stages.common.training.distributed.Trained (its accumulate/backward, so
        each backward is an accumulation micro-step of its backend); None: a plain loss.backward().

        Scored in one forward (every process ran a single chunk): the loss's own backward. Scored in chunks:
        the gradient of the loss with respect to the scores is taken first, then every chunk is re-run with
        its graph and backpropagated with its slice of that gradient, one top-level backward per chunk
        (gradient sync on the last only), as many as every other process runs (repeats of chunk 0 with
        weight 0). Each parameter is thus reduced once per step under DDP/ZeRO/FSDP2, and sharded
        parameters are gathered in lockstep."""
        if self.replay is None:
            with _accumulate(trained, last=True):
                _backward(trained, loss)
        else:
            self.replay.backward(loss, trained)


def _model_device_dtype(disc) -> tuple[torch.device, torch.dtype]:
    param = next(disc.parameters())
    return param.device, param.dtype


def _backbone(disc):
    return getattr(disc, "module", disc).model


def score_groups(disc, processor, prompts: Sequence[Any], segments: Sequence[Sequence[str | None]],
                 layout: str = "shared", *, text_only: bool | None = None, output_router_logits: bool = False,
                 max_segment_tokens: int | None = None, max_row_tokens: int | None = None,
                 global_chunks: Callable[[int], int] | None = None) -> ScoreResult:
    """Score every segment of every prompt group: segments[g] are the texts scored against prompts[g].

    text_only: withhold images (default: the discriminator's own text_only flag; a text-only
    discriminator cannot be given images). max_row_tokens (shared layout): the token budget. A group is
    split over rows of at most that many tokens (each repeats the prompt; a row's mask is t x t), and rows
    run in chunks of at most that many padded tokens; with gradients, backward re-runs one chunk at a time,
    so memory is bounded by the budget however long the group is (stages.common.plan.memory).
    global_chunks(n): the number of chunks every process runs, given this process's n (the largest over the
    processes; None: one process). A process with fewer runs repeats, so sharded parameters (FSDP2,
    ZeRO-3) are gathered as often on every rank.
    With gradients enabled, backpropagate with `ScoreResult.backward(loss)` (it re-runs the chunks; a plain
    loss.backward() raises when the scores were chunked).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown scoring layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if len(prompts) != len(segments):
        raise ValueError(f"{len(prompts)} prompts but {len(segments)} segment lists")
    disc_text_only = is_text_only(disc)
    if text_only is None:
        text_only = disc_text_only
    elif disc_text_only and not text_only:
        raise ValueError("this discriminator is text-only; it cannot score with images")
    encoded = [encode_prompt(processor, p, text_only=text_only) for p in prompts]
    seg_ids = [[encode_segment(processor.tokenizer, s, max_segment_tokens) for s in group] for group in segments]
    if layout == "separate":
        return _score_separate(disc, processor, encoded, seg_ids, output_router_logits)
    return _score_shared(disc, processor, encoded, seg_ids, output_router_logits, max_row_tokens, global_chunks,
                         prefix=layout == "prefix")


def score_segments(disc, processor, prompt: Any, segments: Sequence[str | None], layout: str = "shared",
                   **kwargs) -> torch.Tensor:
    """Raw scores [len(segments)] of segments against one prompt (score_groups for one group)."""
    return score_groups(disc, processor, [prompt], [segments], layout, **kwargs).scores[0]


def _cat_images(rows_prompts: list[EncodedPrompt]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    pixels = [p.pixel_values for p in rows_prompts if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in rows_prompts if p.image_grid_thw is not None]
    if not pixels:
        return None, None
    return torch.cat(pixels), torch.cat(grids)


def _score_separate(disc, processor, encoded, seg_ids, output_router_logits) -> ScoreResult:
    device, dtype = _model_device_dtype(disc)
    pad_id = processor.tokenizer.pad_token_id
    rows, row_prompts, lengths = [], [], []
    for prompt, group in zip(encoded, seg_ids):
        for ids in group:
            rows.append((prompt, ids))
            row_prompts.append(prompt)
            lengths.append(len(prompt) + len(ids))
    if not rows:
        return ScoreResult(scores=[torch.zeros(0, device=device) for _ in encoded])
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mm_types = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, ids) in enumerate(rows):
        n = lengths[r]
        input_ids[r, :n] = torch.cat([prompt.input_ids, torch.tensor(ids, dtype=torch.long)])
        mm_types[r, :len(prompt)] = prompt.mm_token_type_ids
        attention_mask[r, :n] = 1
    pixel_values, grid = _cat_images(row_prompts)
    out = disc(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
               mm_token_type_ids=mm_types.to(device),
               pixel_values=pixel_values.to(device, dtype) if pixel_values is not None else None,
               image_grid_thw=grid.to(device) if grid is not None else None,
               output_router_logits=output_router_logits)
    last = torch.tensor(lengths, device=device) - 1
    flat = out.token_values[torch.arange(len(rows), device=device), last]
    sizes = [len(group) for group in seg_ids]
    return ScoreResult(scores=list(torch.split(flat, sizes)), aux_loss=out.aux_loss, num_tokens=sum(lengths),
                       num_padded_tokens=len(rows) * width, num_rows=len(rows))


@dataclass
class _Row:
    prompt: EncodedPrompt
    group: int
    segments: list[int] = field(default_factory=list)  # indices into the group's segment list
    length: int = 0


def _pack_rows(encoded, seg_ids, max_row_tokens) -> list[_Row]:
    rows = []
    for g, (prompt, group) in enumerate(zip(encoded, seg_ids)):
        row = _Row(prompt, g, [], len(prompt))
        for i, ids in enumerate(group):
            if row.segments and max_row_tokens is not None and row.length + len(ids) > max_row_tokens:
                rows.append(row)
                row = _Row(prompt, g, [], len(prompt))
            row.segments.append(i)
            row.length += len(ids)
        if row.segments:
            rows.append(row)
    return rows


def prompt_positions(disc, prompt: EncodedPrompt) -> torch.Tensor:
    """M-RoPE position ids [3, P] of a prompt alone, from the backbone's own get_rope_index."""
    device = next(disc.parameters()).device
    positions, _ = _backbone(disc).get_rope_index(
        prompt.input_ids[None].to(device), mm_token_type_ids=prompt.mm_token_type_ids[None].to(device),
        image_grid_thw=prompt.image_grid_thw.to(device) if prompt.image_grid_thw is not None else None)
    return positions[:, 0]


def shared_layout_mask(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, T, T] from block ids [B, T] (-1 prompt, 0.. segments, -2 padding): key k is
    visible to query q iff k <= q and k is a prompt token or in q's block; padding sees only itself."""
    return _additive(_block_visibility(blocks), dtype)


def _block_visibility(blocks: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: key k visible to query q iff k <= q and k is a prompt token or in q's block; padding
    sees only itself (so no softmax row is empty)."""
    length = blocks.shape[1]
    idx = torch.arange(length, device=blocks.device)
    causal = idx[None, :, None] >= idx[None, None, :]                     # [1, Tq, Tk]
    q_block, k_block = blocks[:, :, None], blocks[:, None, :]
    visible = causal & ((k_block == _PROMPT_BLOCK) | (k_block == q_block)) & (q_block != _PAD_BLOCK)
    return visible | torch.eye(length, dtype=torch.bool, device=blocks.device)[None]


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Tq, Tk] bool -> additive [B, 1, Tq, Tk] (0 attend, dtype-min blocked)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def _chunk_rows(rows: list[_Row], max_tokens: int | None) -> list[list[int]]:
    """Consecutive rows grouped so that a chunk's padded size (rows x widest row) stays within max_tokens; a
    row wider than the budget is a chunk of its own. No budget: one chunk of every row."""
    if max_tokens is None:
        return [list(range(len(rows)))] if rows else []
    chunks, current, width = [], [], 0
    for r, row in enumerate(rows):
        new_width = max(width, row.length)
        if current and (len(current) + 1) * new_width > max_tokens:
            chunks.append(current)
            current, new_width = [], row.length
        current.append(r)
        width = new_width
    if current:
        chunks.append(current)
    return chunks


def _shared_inputs(disc, processor, rows: list[_Row], seg_ids, prompt_pos_cache: dict) -> tuple[dict, list]:
    """Model inputs of rows in the shared layout, and (row, column, group, segment) of every segment's end."""
    device, dtype = _model_device_dtype(disc)
    pad_id = processor.tokenizer.pad_token_id
    width = max(row.length for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mm_types = torch.zeros((len(rows), width), dtype=torch.long)
    blocks = torch.full((len(rows), width), _PAD_BLOCK, dtype=torch.long)
    positions = torch.zeros((3, len(rows), width), dtype=torch.long)
    last_index = []
    for r, row in enumerate(rows):
        prompt = row.prompt
        p_len = len(prompt)
        if id(prompt) not in prompt_pos_cache:
            prompt_pos_cache[id(prompt)] = prompt_positions(disc, prompt).cpu()
        p_pos = prompt_pos_cache[id(prompt)]
        input_ids[r, :p_len] = prompt.input_ids
        mm_types[r, :p_len] = prompt.mm_token_type_ids
        blocks[r, :p_len] = _PROMPT_BLOCK
        positions[:, r, :p_len] = p_pos
        start = int(p_pos.max()) + 1  # where text after the prompt continues, on all three axes
        col = p_len
        for block, i in enumerate(row.segments):
            ids = seg_ids[row.group][i]
            n = len(ids)
            input_ids[r, col:col + n] = torch.tensor(ids, dtype=torch.long)
            blocks[r, col:col + n] = block
            positions[:, r, col:col + n] = torch.arange(start, start + n)
            last_index.append((r, col + n - 1, row.group, i))
            col += n
    pixel_values, grid = _cat_images([row.prompt for row in rows])
    blocks = blocks.to(device)
    inputs = dict(input_ids=input_ids.to(device), attention_mask=shared_layout_mask(blocks, dtype),
                  position_ids=positions.to(device), mm_token_type_ids=mm_types.to(device),
                  pixel_values=pixel_values.to(device, dtype) if pixel_values is not None else None,
                  image_grid_thw=grid.to(device) if grid is not None else None,
                  aux_loss_mask=(blocks != _PAD_BLOCK).long())
    return inputs, last_index


def _bins(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of segments packed into rows of at most `width` tokens (a longer segment gets a row of its
    own), longest first, each into the first row it fits: rows come out nearly full."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def _prefix_forward(disc, processor, rows: list[_Row], seg_ids, output_router_logits: bool,
                    prompt_pos_cache: dict) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """One chunk in the prefix layout (module docstring): its distinct prompts once with a KV cache, then the
    segments packed into narrow rows on top. Returns the value at every segment's end, the router aux loss
    over all real tokens of both passes, and (group, segment) of every value.

    Long because it builds both passes' inputs: left-padded prompts with their M-RoPE positions, and packed
    segment rows with each segment's own positions and its 4-D mask over the prompt's cache and itself."""
    from stages.common.models.discriminator import router_aux_loss
    from stages.common.rollout.kv_cache import cache_keyword

    device, dtype = _model_device_dtype(disc)
    pad_id = processor.tokenizer.pad_token_id
    by_id = {id(row.prompt): row.prompt for row in rows}   # the rows of a split group share its prompt
    prompts, index_of = list(by_id.values()), {key: i for i, key in enumerate(by_id)}
    prompt_of_row = [index_of[id(row.prompt)] for row in rows]
    # pass 1: the chunk's prompts, left-padded (every prompt ends in the last column)
    width_p = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width_p), pad_id, dtype=torch.long)
    mm_types = torch.zeros((len(prompts), width_p), dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width_p), dtype=torch.long)
    positions = torch.zeros((3, len(prompts), width_p), dtype=torch.long)
    starts = []
    for i, prompt in enumerate(prompts):
        if id(prompt) not in prompt_pos_cache:
            prompt_pos_cache[id(prompt)] = prompt_positions(disc, prompt).cpu()
        p_pos, pad = prompt_pos_cache[id(prompt)], width_p - len(prompt)
        input_ids[i, pad:], mm_types[i, pad:], prompt_mask[i, pad:] = prompt.input_ids, prompt.mm_token_type_ids, 1
        positions[:, i, pad:] = p_pos
        starts.append(int(p_pos.max()) + 1)   # where text after the prompt continues, on all three axes
    pixel_values, grid = _cat_images(prompts)
    want_router = output_router_logits and _is_moe(disc)
    # Pass 1 calls the unwrapped model (under FSDP2 the model itself, so its root unit gathers its parameters)
    # and pass 2 the wrapper: DDP/DeepSpeed see one forward per backward, as in the policy's shared prefix.
    first = getattr(disc, "module", disc)(
        input_ids=input_ids.to(device), attention_mask=prompt_mask.to(device), position_ids=positions.to(device),
        mm_token_type_ids=mm_types.to(device), pixel_values=pixel_values.to(device, dtype) if pixel_values is not None
        else None, image_grid_thw=grid.to(device) if grid is not None else None, use_cache=True,
        output_router_logits=want_router, aux_loss_mask=prompt_mask.to(device))
    cache = first.cache
    if cache is None or cache.get_seq_length() != width_p:
        raise RuntimeError("the discriminator's prompt pass returned no KV cache (gradient checkpointing drops "
                           "it): score with the shared layout, or without checkpointing")

    # pass 2: each row's segments packed into rows as wide as the chunk's longest segment, on its prompt's cache
    seg_width = max(len(seg_ids[row.group][i]) for row in rows for i in row.segments)
    packed = []     # (chunk row, [segment indices]) per packed row
    for r, row in enumerate(rows):
        lengths = [len(seg_ids[row.group][i]) for i in row.segments]
        packed += [(r, [row.segments[j] for j in sorted(b)]) for b in _bins(lengths, seg_width)]
    seg_input = torch.full((len(packed), seg_width), pad_id, dtype=torch.long)
    seg_pos = torch.zeros((3, len(packed), seg_width), dtype=torch.long)
    blocks = torch.full((len(packed), seg_width), _PAD_BLOCK, dtype=torch.long)
    last_index = []
    for k, (r, segments) in enumerate(packed):
        col, start = 0, starts[prompt_of_row[r]]
        for block, i in enumerate(segments):
            ids = seg_ids[rows[r].group][i]
            seg_input[k, col:col + len(ids)] = torch.tensor(ids, dtype=torch.long)
            seg_pos[:, k, col:col + len(ids)] = torch.arange(start, start + len(ids))
            blocks[k, col:col + len(ids)] = block
            last_index.append((k, col + len(ids) - 1, rows[r].group, i))
            col += len(ids)
    cache_rows = torch.tensor([prompt_of_row[r] for r, _ in packed], device=device)
    cache.batch_select_indices(cache_rows)
    blocks = blocks.to(device)
    mask = prefix_layout_mask(prompt_mask.to(device)[cache_rows].bool(), blocks, dtype)
    out = disc(input_ids=seg_input.to(device), attention_mask=mask, position_ids=seg_pos.to(device),
               mm_token_type_ids=torch.zeros_like(seg_input, device=device), use_cache=True,
               output_router_logits=want_router, aux_loss_mask=(blocks != _PAD_BLOCK).long(),
               **{cache_keyword(_backbone(disc)): cache})
    row_idx = torch.tensor([x[0] for x in last_index], device=device)
    col_idx = torch.tensor([x[1] for x in last_index], device=device)
    aux = None
    if want_router:
        aux = router_aux_loss(disc, [first.router_logits, out.router_logits], [prompt_mask, blocks != _PAD_BLOCK])
    # Under FSDP2 a unit gathers its parameters for backward when a gradient reaches its forward's output; the
    # prompt pass is reached only through its cache, inside the layers, so its output joins at weight 0.
    anchor = 0.0 * first.token_values[:, -1].sum()
    return out.token_values[row_idx, col_idx] + anchor, aux, last_index


def prefix_layout_mask(prompt_visible: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [R, 1, W, P + W] of packed segment rows over their prompt's cache: a segment token
    sees its prompt's real tokens (prompt_visible [R, P], False at left padding) and causally its own
    segment (blocks [R, W]: segment ids, -2 padding); padding sees only itself."""
    sees_prompt = prompt_visible[:, None, :] & (blocks[:, :, None] != _PAD_BLOCK)
    return _additive(torch.cat([sees_prompt.expand(-1, blocks.shape[1], -1), _block_visibility(blocks)], dim=2), dtype)


class _ReplayOnly(torch.autograd.Function):
    """Identity on scores that were computed without a graph. Its backward passes the gradient on only inside
    ScoreResult.backward (which then re-runs the chunks); anywhere else it raises, so a plain loss.backward()
    cannot silently leave the discriminator without gradients."""

    @staticmethod
    def forward(ctx, scores, replay):
        ctx.replay = replay
        return scores.clone()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.replay.active:
            raise RuntimeError("these scores were computed in chunks without a graph: backpropagate with "
                               "ScoreResult.backward(loss), which re-runs the chunks")
        return grad, None


@dataclass
class _Replay:
    """What ScoreResult.backward needs to re-run a chunked scoring with gradients (see there)."""

    run_chunk: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]
    sizes: list[int]            # scores per real chunk, in the order the chunks ran
    weights: list[float]        # each real chunk's share of the aux loss
    n_global: int               # chunks every process runs (the real ones, then repeats of chunk 0)
    scores_leaf: torch.Tensor
    aux_leaf: torch.Tensor | None
    active: bool = False

    def backward(self, loss: torch.Tensor, trained) -> None:
        inputs = [self.scores_leaf] + ([self.aux_leaf] if self.aux_leaf is not None else [])
        self.active = True
        try:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        finally:
            self.active = False
        grad_scores = grads[0] if grads[0] is not None else torch.zeros_like(self.scores_leaf)
        grad_aux = grads[1] if len(grads) > 1 else None
        offsets = [0] + torch.tensor(self.sizes).cumsum(0).tolist()
        for i in range(self.n_global):
            real = i < len(self.sizes)
            c = i if real else 0
            with _accumulate(trained, last=i == self.n_global - 1):
                scores, aux = self.run_chunk(c)
                surrogate = (scores * grad_scores[offsets[c]:offsets[c + 1]]).sum()
                if aux is not None and grad_aux is not None:
                    surrogate = surrogate + self.weights[c] * aux * grad_aux
                _backward(trained, surrogate if real else surrogate * 0.0)


def _accumulate(trained, last: bool):
    return trained.accumulate(last=last) if trained is not None else nullcontext()


def _backward(trained, loss: torch.Tensor) -> None:
    if trained is not None:
        trained.backward(loss)
    else:
        loss.backward()


def _score_shared(disc, processor, encoded, seg_ids, output_router_logits, max_row_tokens,
                  global_chunks, prefix: bool = False) -> ScoreResult:
    """Shared layout; with max_row_tokens, rows of at most that many tokens run in chunks of at most that
    many (padded) tokens, so neither the [t, t] masks nor the activations grow with the group.

    Long because it holds both ways of running the chunks: one forward with its graph when every process
    runs a single chunk, else every chunk without a graph (padded to the global count) plus the replay
    that ScoreResult.backward runs."""
    device, _ = _model_device_dtype(disc)
    rows = _pack_rows(encoded, seg_ids, max_row_tokens)
    if not rows:
        return ScoreResult(scores=[torch.zeros(0, device=device) for _ in encoded])
    chunks = _chunk_rows(rows, max_row_tokens)
    n_global = global_chunks(len(chunks)) if global_chunks is not None else len(chunks)
    prompt_pos_cache: dict[int, torch.Tensor] = {}
    located = []   # per chunk: (group, segment) of each score it returns

    def run_chunk(c: int):
        chunk_rows = [rows[r] for r in chunks[c]]
        if prefix:
            values, aux, last_index = _prefix_forward(disc, processor, chunk_rows, seg_ids, output_router_logits,
                                                      prompt_pos_cache)
        else:
            inputs, last_index = _shared_inputs(disc, processor, chunk_rows, seg_ids, prompt_pos_cache)
            out = disc(**inputs, output_router_logits=output_router_logits)
            row_idx = torch.tensor([x[0] for x in last_index], device=device)
            col_idx = torch.tensor([x[1] for x in last_index], device=device)
            values, aux = out.token_values[row_idx, col_idx], out.aux_loss
        if len(located) <= c:
            located.append([(x[2], x[3]) for x in last_index])
        return values, aux

    tokens = [sum(rows[r].length for r in chunk) for chunk in chunks]
    weights = [t / sum(tokens) for t in tokens]   # aux loss: token-weighted mean over chunks
    with_grad = torch.is_grad_enabled() and any(p.requires_grad for p in disc.parameters())
    replay = None
    if with_grad and n_global == 1:
        outs = [run_chunk(0)]   # the graph is kept: the loss's own backward reaches the parameters
    else:
        with torch.no_grad():
            outs = [run_chunk(c) for c in range(len(chunks))]
            for _ in range(n_global - len(chunks)):
                run_chunk(0)    # another process runs more chunks; sharded parameters gather in lockstep
    flat = torch.cat([o[0] for o in outs])
    auxes = [o[1] for o in outs]
    aux = sum(w * a for w, a in zip(weights, auxes)) if all(a is not None for a in auxes) else None
    if with_grad and n_global > 1:
        leaf = flat.detach().requires_grad_()
        aux_leaf = aux.detach().requires_grad_() if aux is not None else None
        replay = _Replay(run_chunk, [len(o[0]) for o in outs], weights, n_global, leaf, aux_leaf)
        flat = _ReplayOnly.apply(leaf, replay)
        aux = _ReplayOnly.apply(aux_leaf, replay) if aux_leaf is not None else None
    # put every score back in (group, segment) order
    where = [gs for chunk in located for gs in chunk]
    order = sorted(range(len(where)), key=lambda j: where[j])
    flat = flat[torch.tensor(order, device=device)]
    sizes = [len(group) for group in seg_ids]
    widths = [max(rows[r].length for r in chunk) for chunk in chunks]
    return ScoreResult(scores=list(torch.split(flat, sizes)), aux_loss=aux,
                       num_tokens=sum(row.length for row in rows),
                       num_padded_tokens=sum(len(c) * w for c, w in zip(chunks, widths)), num_rows=len(rows),
                       num_chunks=len(chunks), replay=replay)


def _is_moe(disc) -> bool:
    return getattr(disc, "module", disc).config.model_type == "qwen3_vl_moe"


# ------------------------------------------------------------------------------------------ warmup

@dataclass
class PreferencePair:
    """One warmup example: a prompt, the teacher's caption/think and a student's caption/think."""

    prompt: Any  # RolloutPrompt-like: .messages, .images
    teacher_caption: str
    teacher_think: str
    student_caption: str
    student_think: str


def _pair_scores(disc, processor, pairs: Sequence[PreferencePair], layout: str, output_router_logits: bool,
                 **kwargs) -> tuple[torch.Tensor, ScoreResult]:
    """[N, 4] scores per pair: teacher caption, teacher think, student caption, student think."""
    groups = [[p.teacher_caption, p.teacher_think, p.student_caption, p.student_think] for p in pairs]
    result = score_groups(disc, processor, [p.prompt for p in pairs], groups, layout,
                          output_router_logits=output_router_logits, **kwargs)
    return torch.stack(result.scores), result


def pair_loss(disc, processor, pairs: Sequence[PreferencePair], *, layout: str = "shared",
              score_l2_coef: float = 0.0, clip: float = SCORE_CLIP, across=None, **score_kwargs
              ) -> tuple[torch.Tensor, dict, ScoreResult]:
    """The pairwise Bradley-Terry objective on (teacher, student) pairs, for the caller to backward:
    BT(caption) + BT(think) + aux_coef * router aux loss (+ score_l2_coef * mean squared score over the
    four score sets), scores clipped to [-clip, clip]. score_kwargs go to score_groups (max_row_tokens,
    global_chunks); `across` (training.processes) makes the means, and the metrics, those over every process's
    pairs (stages.align.objective). Returns (loss, float metrics, the ScoreResult whose backward(loss)
    backpropagates)."""
    raw, result = _pair_scores(disc, processor, pairs, layout, output_router_logits=True, **score_kwargs)
    # a pair is a group of one response; the objective is the game's (stages.align.objective)
    terms = discriminator_objective(
        GroupScores(raw[:, 0], raw[:, 1], raw[:, 2:3], raw[:, 3:4], torch.ones(len(pairs), 1, dtype=torch.bool),
                    result.aux_loss), score_reg=score_l2_coef, clip=clip, aux_coef=aux_loss_coef(disc), across=across)
    with torch.no_grad():
        teacher, student = float(raw[:, :2].sum()), float(raw[:, 2:].sum())
    scores, tokens = 2 * len(pairs), result.num_tokens
    if across is not None:
        teacher, student, scores, tokens = across.sums([teacher, student, scores, tokens])
    metrics = {"loss": terms.loss_value, "bt_caption": terms.bt_caption, "bt_think": terms.bt_think,
               "aux_loss": terms.aux_loss, "acc_caption": terms.acc_caption, "acc_think": terms.acc_think,
               "score_teacher": teacher / max(scores, 1), "score_student": student / max(scores, 1),
               "tokens": int(tokens), "chunks": result.num_chunks}
    return terms.loss, metrics, result


def warmup_step(disc, optimizer, pairs: Sequence[PreferencePair], processor, *, layout: str = "shared",
                scheduler=None, max_grad_norm: float | None = 1.0, score_l2_coef: float = 0.0,
                clip: float = SCORE_CLIP, **score_kwargs) -> dict:
    """One single-process Bradley-Terry step (pair_loss, backward, clip, step). The align stage runs the
    same objective through accelerate instead."""
    disc.train()
    optimizer.zero_grad(set_to_none=True)
    loss, metrics, result = pair_loss(disc, processor, pairs, layout=layout, score_l2_coef=score_l2_coef,
                                      clip=clip, **score_kwargs)
    result.backward(loss)
    if max_grad_norm is not None:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(disc.parameters(), max_grad_norm))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return metrics


@torch.no_grad()
def pairwise_accuracy(disc, processor, pairs: Sequence[PreferencePair], *, layout: str = "shared",
                      batch_size: int = 8, **score_kwargs) -> dict:
    """Held-out pairwise accuracy per segment: the share of pairs scored teacher > student (a tie counts
    one half). Returns {"caption", "think", "mean", "n"}."""
    was_training = disc.training
    disc.eval()
    try:
        hits = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(pairs), batch_size):
            raw, _ = _pair_scores(disc, processor, pairs[start:start + batch_size], layout, False, **score_kwargs)
            raw = raw.double().cpu()
            for k in range(2):  # caption, think
                hits[k] += (raw[:, k] > raw[:, k + 2]).sum() + 0.5 * (raw[:, k] == raw[:, k + 2]).sum()
    finally:
        disc.train(was_training)
    n = len(pairs)
    acc = (hits / max(n, 1)).tolist()
    return {"caption": acc[0], "think": acc[1], "mean": (acc[0] + acc[1]) / 2, "n": n}
