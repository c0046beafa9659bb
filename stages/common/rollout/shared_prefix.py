"""Shared-prefix ("cascade") decode attention for the hf engine.

The n samples of a prompt share its KV cache. Repeating that cache n-fold (what `generate` does, and what
the engine did before) makes every decode step read the prompt's keys and values n times; decode attention
is memory-bound, so on the tiny model those reads were ~40% of a rollout. Here the prompt KV stays stored
once per prompt, [kv_heads, P, prompt_len, head_dim], and each decode step attends in two parts:

    prefix: the queries of a prompt's live rows, stacked, against that prompt's KV once (one matmul per
            prompt and kv head);
    own:    each row's query against its own generated tokens' KV;

then one softmax over both parts' scores (concatenated), and the two weighted value sums added. That is
exactly softmax attention over [prompt | generated], reordered; a test checks it against sdpa.

How it plugs into transformers: the decode forward runs with the text model's attention implementation
switched to "prism_shared_prefix" (registered below) and the cache passed as the `prefix_cache` keyword,
which transformers forwards to every attention call. Each SharedPrefixLayer stores its generated KV in
preallocated buffers; its `update` returns only those, and the attention function finds the prompt part
through `prefix_cache.layers[module.layer_idx]`. A model whose attention does not route through
transformers' AttentionInterface would never reach the function; the engine checks after the first
step that every layer was attended and raises otherwise, so a wrong result can never pass silently.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer

from stages.common.rollout.kv_cache import PreallocatedLayer

IMPLEMENTATION = "prism_shared_prefix"


class PrefixGroups:
    """Which prompt each decode row belongs to, and the padded [prompts x max rows] layout the prefix
    matmul uses. Rows stay sorted by prompt (repeat_interleave order; compaction keeps order)."""

    def __init__(self, group_of_row: torch.Tensor, n_prompts: int):
        self.n_prompts = n_prompts
        self._set(group_of_row)

    def _set(self, group_of_row: torch.Tensor) -> None:
        self.group_of_row = group_of_row
        rows = group_of_row.numel()
        counts = torch.bincount(group_of_row, minlength=self.n_prompts)
        self.width = max(1, int(counts.max())) if rows else 1
        starts = torch.cumsum(counts, 0) - counts
        rank_in_group = torch.arange(rows, device=group_of_row.device) - starts[group_of_row]
        # flat slot of each row in the [prompts x width] layout; an empty slot reads row 0 (any real row: its
        # scores stay finite and its output is never read back)
        self.slot_of_row = group_of_row * self.width + rank_in_group
        row_of_slot = torch.zeros(self.n_prompts * self.width, dtype=torch.long, device=group_of_row.device)
        row_of_slot[self.slot_of_row] = torch.arange(rows, device=group_of_row.device)
        self.row_of_slot = row_of_slot

    def select(self, indices: torch.Tensor) -> None:
        self._set(self.group_of_row[indices])


class SharedPrefixLayer(PreallocatedLayer):
    """One layer's KV: the prompt part once per prompt, the generated part per row (the preallocated
    buffers, one column written per step). `keys`/`values` are the generated part only."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, prefix_valid: torch.Tensor,
                 groups: PrefixGroups, extra_tokens: int):
        rows = groups.group_of_row.numel()
        empty = prefix_keys.new_empty(rows, prefix_keys.shape[1], 0, prefix_keys.shape[-1])
        super().__init__(empty, empty.clone(), extra_tokens)
        # head-major [kvh, P, Lp, D], the layout the attention's slot tensors use (no permute per step)
        self.prefix_keys = prefix_keys.transpose(0, 1).contiguous()
        self.prefix_values = prefix_values.transpose(0, 1).contiguous()
        # additive score bias [1, P, 1, Lp]: 0 for prompt tokens, -inf for left padding
        self.prefix_bias = torch.zeros(prefix_valid.shape, dtype=torch.float32, device=prefix_valid.device
                                       ).masked_fill(~prefix_valid, float("-inf"))[None, :, None, :]
        self.groups = groups
        self.attended = False

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


def install(cache, n_prompts: int, n: int, prompt_mask: torch.Tensor, extra_tokens: int) -> PrefixGroups:
    """Turn a prefill DynamicCache ([P, ...] per layer) into shared-prefix layers for P x n decode rows."""
    device = prompt_mask.device
    groups = PrefixGroups(torch.arange(n_prompts, device=device).repeat_interleave(n), n_prompts)
    valid = prompt_mask.bool()
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise RuntimeError(f"shared-prefix decoding needs full-attention DynamicLayers; layer {i} is "
                               f"{type(layer).__name__}")
        cache.layers[i] = SharedPrefixLayer(layer.keys, layer.values, valid, groups, extra_tokens)
    return groups


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            prefix_cache=None, **kwargs):
    """Attention of one decode token per row over [its prompt's KV (shared) | its own generated KV].

    query [B, H, 1, D]; key/value [B, kvh, Lg, D] (the row's generated tokens, all valid). Returns
    ([B, 1, H, D], None) like transformers' sdpa function."""
    if prefix_cache is None:
        raise RuntimeError("prism_shared_prefix attention called without prefix_cache")
    layer = prefix_cache.layers[module.layer_idx]
    groups: PrefixGroups = layer.groups
    B, H, q_len, D = query.shape
    if q_len != 1:
        raise RuntimeError("prism_shared_prefix attention handles one decode token per row")
    kvh, P, W = key.shape[1], groups.n_prompts, groups.width
    G, Lp = H // kvh, layer.prefix_keys.shape[-2]
    scaling = D ** -0.5 if scaling is None else scaling
    q = query.view(B, kvh, G, D) * scaling

    # The softmax runs in a head-major slot layout [kvh, P, W*G, keys] (a prompt's rows stacked; the prompt
    # KV is stored [kvh, P, Lp, D] to match), so the prompt-sized tensors never move and each small
    # per-row tensor moves with one gather along the row dimension.
    def to_slots(x):   # [B, kvh, G, k] -> [kvh, P, W*G, k]
        return x.transpose(0, 1)[:, groups.row_of_slot].view(kvh, P, W * G, x.shape[-1])

    def to_rows(x):    # [kvh, P, W*G, k] -> [kvh, B, G, k]
        return x.view(kvh, P * W, G, x.shape[-1])[:, groups.slot_of_row]

    s_prefix = torch.matmul(to_slots(q), layer.prefix_keys.transpose(-1, -2)).float() + layer.prefix_bias
    s_own = to_slots(torch.matmul(q, key.transpose(-1, -2)).float())
    weights = torch.softmax(torch.cat([s_prefix, s_own], -1), dim=-1).to(value.dtype)
    out = torch.matmul(to_rows(weights[..., Lp:]).transpose(0, 1), value)                  # [B, kvh, G, D]
    out = out + to_rows(torch.matmul(weights[..., :Lp], layer.prefix_values)).transpose(0, 1)
    layer.attended = True
    return out.reshape(B, 1, H, D), None


AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)


@contextlib.contextmanager
def text_attention(model, implementation: str):
    """Switch the language model's attention implementation for the duration (the vision tower keeps its
    own). The config is shared with training, so it is always restored."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def check_attended(cache) -> None:
    """After a decode forward: every layer must have used the shared-prefix attention (see module doc)."""
    missed = [i for i, layer in enumerate(cache.layers) if not getattr(layer, "attended", False)]
    if missed:
        raise RuntimeError(f"shared-prefix attention was not used by layers {missed}: this model's attention "
                           "does not route through transformers' AttentionInterface; build HFEngine with "
                           "shared_prefix=False")
