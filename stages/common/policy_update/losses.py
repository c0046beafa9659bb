"""Policy-gradient losses for the RLVR and alignment stages: PPO-clip (GRPO, DAPO), GSPO, KL terms.

Shapes: `logp`, `old_logp`, `ref_logp` and `mask` are [B, T] (B responses, T response tokens, right
padded); `mask` is bool or 0/1 and marks the real response tokens. Padded positions never count and
may hold anything (even inf/NaN): they are replaced before any arithmetic that could spread them
(for `kl_penalty`, pass its `mask`).
Advantages are per response [B] (broadcast over tokens) or per token [B, T].

Losses are returned as 0-dim tensors to call `.backward()` on; stats are detached 0-dim tensors
(no device sync here: the stage decides when to call `.item()`), averaged over the valid tokens of
the micro-batch they were computed on.

Gradient accumulation: pass `normalizer` = the count for the whole optimizer step (see
`aggregation_normalizer`) to every micro-batch's loss and call `.backward()` on each without dividing
by the number of micro-batches; the summed gradients then equal those of one big batch:

    n = sum(aggregation_normalizer(mb.mask, agg) for mb in step_micro_batches)
    # with DDP (which averages gradients over W ranks): all-reduce n with SUM, then n = n / W
    for mb in step_micro_batches:
        loss, stats = ppo_clip_loss(..., agg=agg, normalizer=n)
        loss.backward()
"""

from __future__ import annotations

import torch

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# exp() of a log-ratio beyond this overflows or is meaningless; clamping only guards against inf
_MAX_LOG_RATIO = 20.0


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(AGGREGATION_MODES)}")


def _bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(like.shape)}")
    return mask.bool() if mask.dtype != torch.bool else mask


def aggregation_normalizer(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The count `aggregate` divides by for one micro-batch: valid tokens for "token-mean", sequences
    with at least one valid token for the "seq-mean-*" modes. Sum it over the micro-batches of an
    optimizer step to get the `normalizer` for gradient accumulation."""
    _check_mode(mode)
    mask = mask.bool()
    if mode == "token-mean":
        return mask.sum().to(torch.float32)
    return mask.any(dim=-1).sum().to(torch.float32)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar, counting only tokens where `mask` is set.

    token-mean:          sum_{i,t} m_it l_it / sum_{i,t} m_it            (every token weighs the same)
    seq-mean-token-mean: (1/S) sum_i [ sum_t m_it l_it / sum_t m_it ]    (every sequence weighs the same)
    seq-mean-token-sum:  (1/S) sum_i   sum_t m_it l_it
    S = number of sequences with at least one valid token (fully padded rows are ignored).
    `normalizer` replaces the denominator (sum m_it, or S) for gradient accumulation (module docstring).
    With no valid token the loss is 0 (still attached to the graph).
    """
    _check_mode(mode)
    mask = _bool_mask(mask, loss_mat)
    masked = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))
    if normalizer is None:
        normalizer = aggregation_normalizer(mask, mode).to(loss_mat.device)
    if isinstance(normalizer, torch.Tensor):
        # a zero count only happens with nothing to sum (numerator 0): avoid 0/0, keep fractions (n / W)
        normalizer = normalizer.to(device=loss_mat.device, dtype=loss_mat.dtype)
        denominator = torch.where(normalizer > 0, normalizer, torch.ones_like(normalizer))
    else:
        denominator = float(normalizer) if normalizer > 0 else 1.0

    if mode == "token-mean":
        return masked.sum() / denominator
    per_sequence = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / mask.sum(dim=-1).clamp(min=1).to(per_sequence.dtype)
    return per_sequence.sum() / denominator


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values = torch.where(mask, values, torch.zeros_like(values))
    return (values.sum() / mask.sum().clamp(min=1)).detach()


def _token_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        advantages = advantages[:, None]
    elif advantages.shape != like.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(like.shape)}, got {tuple(advantages.shape)}")
    # advantages are targets, never differentiated through
    return advantages.detach().to(like.dtype).expand_as(like)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # ratios in bf16 are too coarse for clip ranges like 3e-4
    return torch.promote_types(t.dtype, torch.float32)


def _masked_log_ratio(logp, old_logp, mask):
    dtype = _compute_dtype(logp)
    log_ratio = logp.to(dtype) - old_logp.detach().to(dtype)
    return torch.where(mask, log_ratio, torch.zeros_like(log_ratio))


def _clip_stats(ratio, token_log_ratio, adv, mask, clip_low, clip_high) -> dict[str, torch.Tensor]:
    ratio = ratio.detach()
    token_log_ratio = token_log_ratio.detach()
    clipped_low = (adv < 0) & (ratio < 1.0 - clip_low)
    clipped_high = (adv > 0) & (ratio > 1.0 + clip_high)
    # k3 estimate of KL(old || new) on tokens sampled from old: (r - 1) - log r >= 0, r the token ratio
    token_ratio = torch.exp(token_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    approx_kl = (token_ratio - 1.0) - token_log_ratio
    return {
        "clipfrac_low": _masked_mean(clipped_low.to(ratio.dtype), mask),
        "clipfrac_high": _masked_mean(clipped_high.to(ratio.dtype), mask),
        "clipfrac": _masked_mean((clipped_low | clipped_high).to(ratio.dtype), mask),
        "approx_kl": _masked_mean(approx_kl, mask),
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_max": torch.where(mask, ratio, torch.full_like(ratio, -torch.inf)).max().detach(),
        "ratio_min": torch.where(mask, ratio, torch.full_like(ratio, torch.inf)).min().detach(),
    }


def _clipped_surrogate(ratio, adv, clip_low, clip_high):
    # pessimistic bound: max of the two losses = min of the two objectives
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token-mean",
                  dual_clip: float | None = None, normalizer: float | torch.Tensor | None = None):
    """PPO-clip policy loss with asymmetric clipping (DAPO's clip-higher) and optional dual clip.

    r_t = exp(logp_t - old_logp_t)
    l_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
    dual clip (c = dual_clip > 1, Ye et al. 2020), for A_t < 0 only: l_t = min(l_t, -A_t c), which
    bounds the loss of a token whose ratio exploded on a negative advantage.
    loss = aggregate(l, mask, agg, normalizer).

    Returns (loss, stats). Stats (over valid tokens): clipfrac_low (A < 0 and r < 1 - clip_low),
    clipfrac_high (A > 0 and r > 1 + clip_high), clipfrac (either), clipfrac_dual (dual clip active),
    approx_kl (k3 estimate of KL(old || new)), ratio_mean, ratio_max, ratio_min.
    """
    mask = _bool_mask(mask, logp)
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} does not match logp {tuple(logp.shape)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = _masked_log_ratio(logp, old_logp, mask)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    adv = _token_advantages(advantages, ratio)

    loss_mat = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    stats = _clip_stats(ratio, log_ratio, adv, mask, clip_low, clip_high)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (loss_mat > dual_bound)
        loss_mat = torch.where(dual_active, dual_bound, loss_mat)
        stats["clipfrac_dual"] = _masked_mean(dual_active.to(ratio.dtype), mask)
    else:
        stats["clipfrac_dual"] = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    return aggregate(loss_mat, mask, agg, normalizer), stats


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_low: float = 3e-4, clip_high: float = 4e-4, agg: str = "seq-mean-token-mean",
              normalizer: float | torch.Tensor | None = None):
    """GSPO: PPO-clip on a length-normalised sequence-level importance ratio (GSPO-token form).

    s_i   = exp( (1/|y_i|) sum_t (logp_it - old_logp_it) )          (geometric mean of token ratios)
    s_it  = sg[s_i] * exp(logp_it - sg[logp_it])                      (value s_i, d s_it/d logp_it = s_i)
    l_it  = max(-A_it s_it, -A_it clip(s_it, 1 - clip_low, 1 + clip_high))
    loss  = aggregate(l, mask, agg, normalizer)

    Every token of a sequence has the same ratio value s_i, so clipping acts on whole sequences; with
    per-sequence advantages and seq-mean-token-mean this is the paper's sequence objective, whose
    gradient on token t of sequence i is -A_i s_i / |y_i| (divided by the number of sequences).
    Stats as in `ppo_clip_loss`, over valid tokens, with r = s_i (a clipped sequence counts with all
    its tokens); approx_kl is still per token.
    """
    mask = _bool_mask(mask, logp)
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} does not match logp {tuple(logp.shape)}")
    token_log_ratio = _masked_log_ratio(logp, old_logp, mask)
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(token_log_ratio.dtype)
    sequence_log_ratio = (token_log_ratio.sum(dim=-1, keepdim=True) / lengths).detach()

    logp_c = logp.to(token_log_ratio.dtype)
    logp_c = torch.where(mask, logp_c, torch.zeros_like(logp_c))
    # value: sequence log-ratio; gradient: d/d logp_t = 1 per token
    token_form_log_ratio = sequence_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO) + logp_c - logp_c.detach()
    ratio = torch.exp(token_form_log_ratio)
    adv = _token_advantages(advantages, ratio)

    loss_mat = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    stats = _clip_stats(ratio, token_log_ratio, adv, mask, clip_low, clip_high)
    return aggregate(loss_mat, mask, agg, normalizer), stats


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    k1: logp - ref_logp                                   (unbiased, high variance, can be negative)
    k3: exp(ref_logp - logp) - (ref_logp - logp) - 1      (unbiased, low variance, always >= 0)
    Returns [B, T] like logp, to be reduced with `aggregate`. Pass `mask` when padded positions may
    hold inf/NaN: they are then zeroed before the exp, so no NaN reaches the gradient. The reference
    is never differentiated through.
    """
    dtype = _compute_dtype(logp)
    log_ratio_ref = ref_logp.detach().to(dtype) - logp.to(dtype)
    if mask is not None:
        mask = _bool_mask(mask, logp)
        log_ratio_ref = torch.where(mask, log_ratio_ref, torch.zeros_like(log_ratio_ref))
    if kind == "k1":
        return -log_ratio_ref
    if kind == "k3":
        clamped = log_ratio_ref.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(clamped) - clamped - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1' or 'k3'")
