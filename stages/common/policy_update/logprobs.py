"""Per-token logprobs (and entropy) of responses under a policy, for RL / align training, with gradients.

How the stages use it:

    batch = build_policy_batch(processor, prompts, responses, prompt_index)
    for rows in make_microbatches(batch["lengths"].tolist(), max_tokens=16384):
        mb = select_rows(batch, rows)
        logp, entropy = response_logprobs(model, mb, temperature=T, with_entropy=True)   # [b, T'] each
        loss = policy_loss(logp, old_logp[rows], advantages[rows], mb["response_mask"]) ...

The logprob convention matches the rollout engines (stages.common.rollout.hf): log_softmax(logits / T)
over the full vocabulary with the vision special tokens masked to -inf, before any top-k/top-p truncation
(`sampling_logprobs`). So with the same temperature, the engine's Completion.logprobs are this function's
values at the sampling weights (within float error).

Memory: the [tokens x vocab] logits never exist whole. The backbone yields hidden states; only the
positions that predict response tokens are kept; lm_head + log-softmax + gather then run chunk by chunk,
and under autograd each chunk is checkpointed, so backward recomputes its logits instead of keeping them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from stages.common.rollout.base import RolloutPrompt
from stages.common.rollout.kv_cache import cache_keyword, output_cache
from stages.common.rollout.prompts import (
    banned_token_mask,
    encode_prompts,
    image_patch_counts,
    prompt_positions,
    tokenizer_of,
    vision_token_ids,
)

DEFAULT_CHUNK_TOKENS = 512   # 512 x 151,936 fp32 logits = 311 MB per live buffer

# Per-row tensors of a policy batch (sliced by select_rows); pixel_values/image_grid_thw are sliced by counts.
ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "response_ids", "response_mask", "prompt_lengths",
            "response_lengths", "lengths", "pixel_counts", "image_counts", "prompt_index")
# Per-prompt tensors (the unique prompts, left-padded, for the shared-prefix path); select_rows keeps them whole.
PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask", "prompt_mm_token_type_ids", "prompt_pixel_values",
               "prompt_image_grid_thw", "prompt_pixel_counts", "prompt_image_counts")


# ---- the convention -------------------------------------------------------------------------------------

def sampling_logprobs(logits: torch.Tensor, temperature: float, banned: torch.Tensor | None) -> torch.Tensor:
    """log_softmax(logits / temperature) with banned tokens at -inf (temperature <= 0 counts as 1, the
    convention for greedy decoding). THE convention shared by the engines and by response_logprobs."""
    z = logits.float()
    if temperature > 0 and temperature != 1.0:
        z = z / temperature
    if banned is not None:
        z = z.masked_fill(banned, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def output_vocab_size(model) -> int:
    """Rows of the vocabulary projection, from its declared shape: under DeepSpeed ZeRO-3 the weight itself
    is a 1-D placeholder (weight.shape[0] == 0), so the banned-token mask would be empty."""
    head = model.get_output_embeddings()
    size = getattr(head, "out_features", None)
    return int(size) if size else int(model.config.get_text_config().vocab_size)


# ---- micro-batching -------------------------------------------------------------------------------------

def make_microbatches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group row indices so each group's padded size (rows x longest row) stays within max_tokens.

    Longest first, greedy: a group takes the next row while (rows + 1) x its first (longest) length fits.
    Every index appears exactly once; a row longer than max_tokens alone forms its own group (it cannot be
    split), so the budget is exceeded only there."""
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# ---- the training batch ---------------------------------------------------------------------------------

def build_policy_batch(processor, prompts: Sequence[RolloutPrompt], responses: Sequence[Sequence[int]],
                       prompt_index: Sequence[int], *, suppress_vision_tokens: bool = True) -> dict:
    """Rows prompt + response, right-padded, ready for response_logprobs.

    prompts: the unique prompts; responses[i]: the token ids of row i (Completion.token_ids, EOS included);
    prompt_index[i]: which prompt row i answers (for engine output: [p for p in range(P) for _ in range(n)]).

    Returns a dict of tensors: input_ids/attention_mask/mm_token_type_ids [B, L] (generated tokens have
    mm type 0, as M-RoPE needs), pixel_values/image_grid_thw (each row's images, in row order) when any
    prompt has images, response_ids/response_mask [B, T] (T = longest response; the mask covers generated
    tokens only), prompt_lengths/response_lengths/lengths [B], pixel_counts/image_counts [B] (for
    select_rows), suppress_token_ids (the vision tokens the engines never sample; masked the same way);
    prompt_index [B] and the PROMPT_KEYS (each unique prompt once, left-padded) for the shared-prefix path."""
    if len(responses) != len(prompt_index):
        raise ValueError(f"{len(responses)} responses but {len(prompt_index)} prompt indices")
    enc = encode_prompts(processor, prompts, padding_side="left")
    valid = enc["attention_mask"].bool()
    prompt_ids = [enc["input_ids"][p][valid[p]] for p in range(len(prompts))]
    prompt_mm = [enc["mm_token_type_ids"][p][valid[p]] for p in range(len(prompts))]
    pad_id = tokenizer_of(processor).pad_token_id or 0

    rows = len(responses)
    prompt_lengths = torch.tensor([len(prompt_ids[p]) for p in prompt_index], dtype=torch.long)
    response_lengths = torch.tensor([len(r) for r in responses], dtype=torch.long)
    lengths = prompt_lengths + response_lengths
    L, T = int(lengths.max()) if rows else 0, int(response_lengths.max()) if rows else 0
    input_ids = torch.full((rows, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(rows, L, dtype=torch.long)
    mm_token_type_ids = torch.zeros(rows, L, dtype=enc["mm_token_type_ids"].dtype)
    response_ids = torch.full((rows, T), pad_id, dtype=torch.long)
    response_mask = torch.zeros(rows, T, dtype=torch.bool)
    for i, (p, resp) in enumerate(zip(prompt_index, responses)):
        n_prompt, n_resp = len(prompt_ids[p]), len(resp)
        resp_t = torch.as_tensor(list(resp), dtype=torch.long)
        input_ids[i, :n_prompt] = prompt_ids[p]
        input_ids[i, n_prompt:n_prompt + n_resp] = resp_t
        attention_mask[i, :n_prompt + n_resp] = 1
        mm_token_type_ids[i, :n_prompt] = prompt_mm[p]
        response_ids[i, :n_resp] = resp_t
        response_mask[i, :n_resp] = True

    batch = dict(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                 response_ids=response_ids, response_mask=response_mask, prompt_lengths=prompt_lengths,
                 response_lengths=response_lengths, lengths=lengths)
    batch.update(_images_and_prompt_keys(enc, prompts, prompt_index))
    ids = vision_token_ids(processor) if suppress_vision_tokens else []
    batch["suppress_token_ids"] = torch.tensor(ids, dtype=torch.long)
    return batch


def _images_and_prompt_keys(enc: dict, prompts: Sequence[RolloutPrompt], prompt_index: Sequence[int]) -> dict:
    """Each row's images (in row order) with their counts, and the unique prompts (PROMPT_KEYS)."""
    patch_counts = image_patch_counts(prompts, enc.get("image_grid_thw"))
    out = {"pixel_counts": torch.tensor([patch_counts[p] for p in prompt_index], dtype=torch.long),
           "image_counts": torch.tensor([len(prompts[p].images) for p in prompt_index], dtype=torch.long)}
    if enc.get("pixel_values") is not None:
        pixel_starts = [0] + torch.tensor(patch_counts).cumsum(0).tolist()
        image_starts = [0] + torch.tensor([len(p.images) for p in prompts]).cumsum(0).tolist()
        out["pixel_values"] = torch.cat([enc["pixel_values"][pixel_starts[p]:pixel_starts[p + 1]]
                                         for p in prompt_index])
        out["image_grid_thw"] = torch.cat([enc["image_grid_thw"][image_starts[p]:image_starts[p + 1]]
                                           for p in prompt_index])
    out["prompt_index"] = torch.as_tensor(list(prompt_index), dtype=torch.long)
    out.update(prompt_input_ids=enc["input_ids"], prompt_attention_mask=enc["attention_mask"],
               prompt_mm_token_type_ids=enc["mm_token_type_ids"],
               prompt_pixel_counts=torch.tensor(patch_counts, dtype=torch.long),
               prompt_image_counts=torch.tensor([len(p.images) for p in prompts], dtype=torch.long))
    if enc.get("pixel_values") is not None:
        out.update(prompt_pixel_values=enc["pixel_values"], prompt_image_grid_thw=enc["image_grid_thw"])
    return out


def select_rows(batch: dict, rows: Sequence[int]) -> dict:
    """The sub-batch of `rows` (e.g. one micro-batch), padding trimmed to its longest row, images included."""
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    out = {k: batch[k][rows_t] for k in ROW_KEYS if k in batch}
    L, T = int(out["lengths"].max()), int(out["response_lengths"].max())
    for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[k] = out[k][:, :L]
    for k in ("response_ids", "response_mask"):
        out[k] = out[k][:, :T]
    if batch.get("pixel_values") is not None:
        pixel_starts = torch.cat([torch.zeros(1, dtype=torch.long), batch["pixel_counts"].cumsum(0)]).tolist()
        image_starts = torch.cat([torch.zeros(1, dtype=torch.long), batch["image_counts"].cumsum(0)]).tolist()
        pix = [batch["pixel_values"][pixel_starts[r]:pixel_starts[r + 1]] for r in rows_t.tolist()]
        grid = [batch["image_grid_thw"][image_starts[r]:image_starts[r + 1]] for r in rows_t.tolist()]
        if int(out["image_counts"].sum()) > 0:
            out["pixel_values"] = torch.cat(pix)
            out["image_grid_thw"] = torch.cat(grid)
    out["suppress_token_ids"] = batch.get("suppress_token_ids", torch.zeros(0, dtype=torch.long))
    out.update({k: batch[k] for k in PROMPT_KEYS if k in batch})
    return out


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ---- logprobs -------------------------------------------------------------------------------------------

def response_logprobs(model, batch: dict, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_TOKENS,
                      with_entropy: bool = False, shared_prefix: bool = False,
                      global_chunks: Callable[[int], int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logprob of each response token (and the entropy of its predictive distribution) under `model`.

    Returns (logp [B, T], entropy [B, T] or None), zero where response_mask is False. Differentiable when
    grad is enabled; memory for the vocabulary projection is bounded by chunk_size x vocab (see module doc).
    shared_prefix=False runs every row as prompt + response (positions, M-RoPE with images included, computed
    by the model from the full sequence); True runs each distinct prompt once (shared_prefix_predictors):
    same values and gradients, less compute when rows share prompts (a GRPO group shares one).
    global_chunks(n): how many vocabulary chunks every process runs given this one's n (the largest over the
    processes; see chunked_token_logprobs). None: this process's own count.
    """
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    batch = to_device(batch, device)
    mask = batch["response_mask"]
    if shared_prefix:
        h = shared_prefix_predictors(model, batch)[mask]                                         # [N, H]
    else:
        hidden = backbone_hidden_states(model, batch)                                            # [B, L, H]
        # The hidden state at position j predicts token j + 1: response token t of row b is predicted at
        # prompt_length_b - 1 + t.
        T = mask.shape[1]
        predict_at = (batch["prompt_lengths"].view(-1, 1) - 1 + torch.arange(T, device=device)).clamp(
            max=hidden.shape[1] - 1)
        h = hidden.gather(1, predict_at.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))[mask]    # [N, H]
    targets = batch["response_ids"][mask]                                                      # [N]
    suppress = batch.get("suppress_token_ids")
    banned = None
    if suppress is not None and suppress.numel():
        banned = banned_token_mask(output_vocab_size(inner), suppress.tolist(), device)
    n_chunks = -(-h.shape[0] // chunk_size)
    logp_flat, ent_flat = chunked_token_logprobs(inner.get_output_embeddings(), h, targets, temperature, banned,
                                                 chunk_size, with_entropy,
                                                 n_chunks=global_chunks(n_chunks) if global_chunks else None)
    logp = torch.zeros(mask.shape, dtype=logp_flat.dtype, device=device).masked_scatter(mask, logp_flat)
    entropy = None
    if with_entropy:
        entropy = torch.zeros(mask.shape, dtype=ent_flat.dtype, device=device).masked_scatter(mask, ent_flat)
    return logp, entropy


def backbone_hidden_states(model, batch: dict) -> torch.Tensor:
    """Final (normed) hidden states of the language model: [B, L, H].

    The call goes through `model` itself (a DDP/accelerate wrapper included: calling the inner backbone
    would bypass DDP's gradient-sync bookkeeping), asking for hidden states and the logits of one
    position only, so the [B, L, vocab] logits are never built here."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False, output_hidden_states=True,
                  logits_to_keep=1)
    if batch.get("pixel_values") is not None:
        kwargs.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    return model(**kwargs).hidden_states[-1]


def shared_prefix_supported(model) -> bool:
    """Whether the two-pass shared-prefix forward applies: not under gradient checkpointing, which makes
    transformers drop the KV cache that carries the prompt into the response pass."""
    inner = getattr(model, "module", model)
    flag = "is_activation_checkpointing" if hasattr(inner, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return not getattr(inner, flag, False)


def shared_prefix_predictors(model, batch: dict) -> torch.Tensor:
    """Final hidden states that predict each response token, [B, T, H], running each distinct prompt once.

    Pass 1 runs the batch's distinct prompts (left-padded, images through the vision tower once) with a KV
    cache; each row then takes its prompt's cache rows (an index: gradients of the n rows sum into the
    prompt) and pass 2 runs only the responses on top, with explicit M-RoPE positions continuing the
    prompt's. Response token 0 is predicted by the prompt's last hidden state, token t by response
    position t - 1. Pass 1 calls the unwrapped model and pass 2 the wrapper (DDP/DeepSpeed), so the wrapper
    sees one forward per backward; its gradient hooks live on the parameters and fire for both passes.
    """
    inner = getattr(model, "module", model)
    used, row_prompt = torch.unique(batch["prompt_index"], return_inverse=True)
    prompt_mask = batch["prompt_attention_mask"][used]
    first = int(prompt_mask.any(0).long().argmax())       # drop columns that are padding in every used prompt
    enc = dict(input_ids=batch["prompt_input_ids"][used][:, first:], attention_mask=prompt_mask[:, first:],
               mm_token_type_ids=batch["prompt_mm_token_type_ids"][used][:, first:])
    if batch.get("prompt_pixel_values") is not None:
        pixel_starts = [0] + batch["prompt_pixel_counts"].cumsum(0).tolist()
        image_starts = [0] + batch["prompt_image_counts"].cumsum(0).tolist()
        pixels = [batch["prompt_pixel_values"][pixel_starts[p]:pixel_starts[p + 1]] for p in used.tolist()]
        grids = [batch["prompt_image_grid_thw"][image_starts[p]:image_starts[p + 1]] for p in used.tolist()]
        if sum(len(g) for g in grids):
            enc.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
    positions, rope_deltas = prompt_positions(inner, enc)
    out = inner(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=positions,
                pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"), use_cache=True,
                output_hidden_states=True, logits_to_keep=1)
    cache, prompt_len = output_cache(out), enc["input_ids"].shape[1]
    last = out.hidden_states[-1][:, -1]                   # left-padded: every prompt ends in the last column
    cache.batch_select_indices(row_prompt)

    responses = batch["response_ids"]
    T = responses.shape[1]
    text_pos = enc["attention_mask"].sum(-1)[row_prompt].view(-1, 1) + torch.arange(T, device=responses.device)
    mrope = (text_pos + rope_deltas[row_prompt].view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
    attention_mask = torch.cat([enc["attention_mask"][row_prompt], batch["response_mask"].long()], 1)
    hidden = model(input_ids=responses, attention_mask=attention_mask,
                   position_ids=torch.cat([text_pos.unsqueeze(0), mrope], 0), use_cache=True,
                   output_hidden_states=True, logits_to_keep=1, **{cache_keyword(inner): cache}).hidden_states[-1]
    if cache.get_seq_length() != prompt_len + T:
        raise RuntimeError("the response pass did not extend the prompt's KV cache (gradient checkpointing "
                           "drops it); use the full-sequence path (shared_prefix=False)")
    return torch.cat([last[row_prompt].unsqueeze(1), hidden[:, :-1]], 1)


def make_prefix_microbatches(prompt_index: Sequence[int], prompt_lengths: Sequence[int],
                             response_lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches for the shared-prefix path: rows kept together by prompt, a group taking the next row
    while (distinct prompts x longest prompt + rows x longest response) stays within max_tokens. Every
    index appears exactly once; a row that alone exceeds the budget forms its own group."""
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    order = sorted(range(len(prompt_index)), key=lambda i: (int(prompt_index[i]), -int(response_lengths[i])))
    groups: list[list[int]] = []
    prompts: set[int] = set()
    longest_prompt = longest_response = 0
    for i in order:
        p, lp, lr = int(prompt_index[i]), int(prompt_lengths[i]), int(response_lengths[i])
        if groups:
            n_prompts = len(prompts | {p})
            cost = n_prompts * max(longest_prompt, lp) + (len(groups[-1]) + 1) * max(longest_response, lr)
            if cost <= max_tokens:
                groups[-1].append(i)
                prompts.add(p)
                longest_prompt, longest_response = max(longest_prompt, lp), max(longest_response, lr)
                continue
        groups.append([i])
        prompts, longest_prompt, longest_response = {p}, lp, lr
    return groups


def chunked_token_logprobs(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                           banned: torch.Tensor | None, chunk_size: int = DEFAULT_CHUNK_TOKENS,
                           with_entropy: bool = False, n_chunks: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logp[i] = sampling_logprobs(lm_head(hidden[i]))[targets[i]] for rows i of hidden [N, H], computed
    chunk_size rows at a time; with autograd on, each chunk is recomputed in backward (checkpoint).

    n_chunks: run this many lm_head calls even if fewer chunks hold tokens (the count every process runs).
    Under ZeRO-3 each lm_head call gathers its weight (forward, and again in the checkpoint's backward), so
    processes with different response token counts must still call it equally often: the extra calls run
    the first row again and enter the result times 0, which keeps them in the backward too."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))

    def run(h, tgt):
        if needs_grad:
            return checkpoint(_chunk_logprobs, lm_head, h, tgt, temperature, banned, with_entropy, use_reentrant=False)
        return _chunk_logprobs(lm_head, h, tgt, temperature, banned, with_entropy)

    logps, ents = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        lp, ent = run(hidden[start:start + chunk_size], targets[start:start + chunk_size])
        logps.append(lp)
        ents.append(ent)
    extra = (n_chunks or 0) - len(logps)
    if extra > 0 and hidden.shape[0] == 0:
        raise ValueError("no tokens to repeat: a process without response tokens cannot join the chunk count")
    dummy = sum(run(hidden[:1], targets[:1])[0].clamp(min=-1e4).sum() for _ in range(extra)) if extra > 0 else None
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    logp = torch.cat(logps)
    if dummy is not None:
        logp = logp + 0.0 * dummy
    return logp, (torch.cat(ents) if with_entropy else None)


def _chunk_logprobs(lm_head, h, tgt, temperature, banned, with_entropy):
    # In place on the fresh logits (linear's backward does not need its output): one [chunk, V] buffer fewer.
    z = lm_head(h).float()
    if temperature > 0 and temperature != 1.0:
        z.div_(temperature)
    if banned is not None:
        z.masked_fill_(banned, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        # H = lse - sum p z; banned entries (p = 0, z = -inf) are zeroed first so no 0 * inf appears.
        finite_z = z.masked_fill(banned, 0.0) if banned is not None else z
        entropy = lse - (torch.softmax(z, dim=-1) * finite_z).sum(-1)
    return logp, entropy


def full_logits_logprobs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Reference path: the whole [B, L, V] logits, then log_softmax and gather. For tests and benchmarks
    only (it is what chunked_token_logprobs avoids)."""
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    batch = to_device(batch, device)
    hidden = backbone_hidden_states(model, batch)
    suppress = batch.get("suppress_token_ids")
    banned = None
    if suppress is not None and suppress.numel():
        banned = banned_token_mask(output_vocab_size(inner), suppress.tolist(), device)
    all_logp = sampling_logprobs(inner.get_output_embeddings()(hidden), temperature, banned)     # [B, L, V]
    next_token_logp = all_logp[:, :-1].gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    T = batch["response_mask"].shape[1]
    predict_at = (batch["prompt_lengths"].view(-1, 1) - 1 + torch.arange(T, device=device)).clamp(
        max=next_token_logp.shape[1] - 1)
    logp = next_token_logp.gather(1, predict_at)
    return logp.masked_fill(~batch["response_mask"], 0.0)
