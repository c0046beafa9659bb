"""The SFT objective: summed next-token NLL over assistant tokens, normalised by the step's token count.

The logits over a 151,936-entry vocabulary for an 8K-token response would take 5 GB in fp32, so the
model is run for its last hidden states only (logits_to_keep=1) and the NLL is computed chunk by chunk
by stages.common.policy_update.logprobs (the same function RL uses for its logprobs).
"""

from __future__ import annotations

import torch

from stages.common.policy_update.logprobs import chunked_token_logprobs
from stages.sft.data import IGNORE

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def lm_head_of(model):
    inner = getattr(model, "module", model)
    return inner.get_output_embeddings()


def summed_nll(model, batch: dict, chunk_size: int = 1024, global_chunks=None) -> tuple[torch.Tensor, int]:
    """(sum of -log p(target) over target positions, number of target positions) for one micro-batch.
    global_chunks(n): the lm_head chunk count every process runs given this one's n (training.count_sync;
    ZeRO-3 gathers lm_head per chunk, so a process with fewer target tokens, or none, runs repeats)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if inputs.get("attention_mask") is None:
        inputs.pop("attention_mask", None)
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]                    # [B, L, H] after the final norm
    targets = batch["targets"].to(hidden.device)
    mask = targets != IGNORE
    rows, cols = mask.nonzero(as_tuple=True)
    n_local = -(-int(rows.numel()) // chunk_size)
    n_global = global_chunks(n_local) if global_chunks is not None else n_local
    if rows.numel() == 0:
        if n_global == 0:
            return hidden.sum() * 0.0, 0
        # no target here, some elsewhere: the same lm_head calls on position 0, entering the loss times 0
        logp, _ = chunked_token_logprobs(lm_head_of(model), hidden[0, :1], batch["input_ids"][0, :1].to(hidden.device),
                                         temperature=1.0, banned=None, chunk_size=chunk_size, n_chunks=n_global)
        return logp.float().clamp(min=-1e4).sum() * 0.0 + hidden.sum() * 0.0, 0
    logp, _ = chunked_token_logprobs(lm_head_of(model), hidden[rows, cols], targets[rows, cols], temperature=1.0,
                                     banned=None, chunk_size=chunk_size, n_chunks=n_global)
    return -logp.float().sum(), int(rows.numel())
