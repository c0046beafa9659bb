"""PRISM alignment-stage advantages and discriminator losses (docs/method.md).

The policy is rewarded by a discriminator that scores each response's caption (perception) and think
(reasoning) segments separately. Per prompt group of rollouts:

  1. a format-invalid response gets, for each score type, (lowest format-valid score in its group - 1);
  2. GN(x) = (x - group mean) / (group std + 1e-6), sample std (n - 1, as torch.std); a group of one
     response uses mean 0 and std 1; n >= 2 identical values give 0;
  3. A = alpha * GN(s_caption) + (1 - alpha) * GN(s_think) - format_penalty * 1[format invalid].

A is per response; the stage broadcasts it to every token of the response.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# GN is the GRPO group normalisation (same conventions), shared rather than duplicated
from stages.common.policy_update.advantages import GroupIds, group_index, group_normalized_advantages

_GN_EPS = 1e-6


def _scores_1d(values, name: str, num_items: int | None, device) -> torch.Tensor:
    t = torch.as_tensor(values, device=device)
    if t.dim() != 1 or (num_items is not None and t.numel() != num_items):
        expected = f"[{num_items}]" if num_items is not None else "1-D"
        raise ValueError(f"{name} must have shape {expected} (one value per response), got {tuple(t.shape)}")
    return t


def prism_advantages(caption_scores, think_scores, format_ok, group_ids: GroupIds,
                     alpha: float = 0.5, format_penalty: float = 1.5) -> torch.Tensor:
    """The PRISM policy advantage (module docstring), one float32 value per response.

    caption_scores, think_scores: discriminator scores [N] (any float dtype and device). The scores of
        format-invalid responses are ignored and may be anything, NaN included (the stage may not
        have scored responses with no caption/think segment).
    format_ok: bool [N]; group_ids: [N] prompt group of each response (tensor or list).

    A group with no format-valid response has no "lowest valid score": every response in it gets
    score 0 for both types, so GN is 0 (identical values, or a lone response scored 0) and
    A = -format_penalty for each -- the group only learns to fix its format.
    Returns float32 [N] on the device of caption_scores.
    """
    caption = _scores_1d(caption_scores, "caption_scores", None, None)
    device = caption.device
    num_items = caption.numel()
    think = _scores_1d(think_scores, "think_scores", num_items, device)
    valid = _scores_1d(format_ok, "format_ok", num_items, device).bool()
    index, num_groups, _ = group_index(group_ids, num_items, device)

    valid_in_group = torch.zeros(num_groups, dtype=torch.long, device=device).index_add(0, index, valid.long())
    group_has_valid = valid_in_group > 0

    def fill_invalid(scores: torch.Tensor) -> torch.Tensor:
        scores = scores.to(torch.float64 if device.type != "mps" else torch.float32)
        # min over valid responses only: invalid slots may hold NaN or stale values
        lowest_valid = torch.full((num_groups,), torch.inf, dtype=scores.dtype, device=device)
        lowest_valid = lowest_valid.scatter_reduce(0, index[valid], scores[valid], "amin")
        fill = torch.where(group_has_valid, lowest_valid - 1.0, torch.zeros_like(lowest_valid))
        return torch.where(valid, scores, fill[index])

    gn_caption = group_normalized_advantages(fill_invalid(caption), index, eps=_GN_EPS)
    gn_think = group_normalized_advantages(fill_invalid(think), index, eps=_GN_EPS)
    return alpha * gn_caption + (1.0 - alpha) * gn_think - format_penalty * (~valid).to(torch.float32)


def acc_gated_advantages(adv, acc, correct_threshold: float = 0.5) -> torch.Tensor:
    """Gate the alignment advantage by answer correctness (variant "acc-gated", off by default).

        A'_i = A_i             if acc_i >= correct_threshold   (correct: keep the discriminator's signal)
        A'_i = min(A_i, 0)     otherwise                       (incorrect: may be pushed down, never up)

    Why: the discriminator rewards teacher-like style; a wrong answer that sounds like the teacher
    must not be reinforced, while its penalties (bad style, bad format) still apply. Correct
    responses keep negative values too, so the policy still moves toward the teacher's distribution.
    acc is 0/1 from the reward function (threshold 0.5 also accepts partial credit >= 0.5).
    Returns float32 [N] on adv's device.
    """
    adv = _scores_1d(adv, "adv", None, None).to(torch.float32)
    acc = _scores_1d(acc, "acc", adv.numel(), adv.device)
    correct = acc.to(torch.float32) >= correct_threshold
    return torch.where(correct, adv, adv.clamp(max=0.0))


def rlvr_mixed_advantages(adv, rlvr_scores, group_ids: GroupIds) -> torch.Tensor:
    """Add the group-normalised verifiable reward to the alignment advantage (variant "rlvr-mixed").

        A'_i = A_i + GN(r)_i,   r_i = 0.8 acc_i + 0.2 format_i (precomputed `score` of compute_score)

    GN as in `prism_advantages` (sample std, +1e-6, group of one: mean 0 std 1, identical -> 0).
    Returns float32 [N] on adv's device.
    """
    adv = _scores_1d(adv, "adv", None, None).to(torch.float32)
    rewards = _scores_1d(rlvr_scores, "rlvr_scores", adv.numel(), adv.device)
    return adv + group_normalized_advantages(rewards, group_ids, eps=_GN_EPS).to(adv.device)


# The advantage modes `prism align --advantage-mode` offers (the ADVANTAGE_MODES table in stages/align/config.py names
# them): (the PRISM advantages [N], the verifiable rewards {"acc", "score"} [N], group ids) -> the advantages used.

def discriminator_only(adv, rewards: dict, group_ids: GroupIds) -> torch.Tensor:
    return adv


def gated_by_accuracy(adv, rewards: dict, group_ids: GroupIds) -> torch.Tensor:
    return acc_gated_advantages(adv, rewards["acc"])


def mixed_with_rlvr(adv, rewards: dict, group_ids: GroupIds) -> torch.Tensor:
    return rlvr_mixed_advantages(adv, rewards["score"], group_ids)


def bradley_terry_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor,
                       mask: torch.Tensor | None = None, denominator: float | None = None) -> torch.Tensor:
    """Discriminator pairwise loss: mean over pairs of -log sigmoid(s_teacher - s_student).

    The discriminator minimises it (teacher above student). `mask` (bool [N]) selects the pairs
    that count -- the stage passes format-valid student responses. No selected pair gives 0, still
    attached to the graph so `.backward()` works on every rank. `denominator` replaces the local count of
    pairs in the mean: under several processes, the global count's share per process, so that the
    backend's average over processes gives the mean over every process's pairs.
    """
    if teacher_scores.shape != student_scores.shape:
        raise ValueError(f"teacher_scores {tuple(teacher_scores.shape)} and student_scores "
                         f"{tuple(student_scores.shape)} must have the same shape")
    margins = teacher_scores - student_scores
    if mask is None:
        # logsigmoid is the stable form of log(sigmoid(.)) for large margins
        pair_losses = -F.logsigmoid(margins)
        if denominator is not None:
            return pair_losses.sum() / _positive(denominator)
        return pair_losses.mean() if pair_losses.numel() else pair_losses.sum()
    mask = mask.to(device=margins.device).bool()
    if mask.shape != margins.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match scores {tuple(margins.shape)}")
    # select before logsigmoid: excluded pairs may hold NaN, which would leak into the gradient
    margins = torch.where(mask, margins, torch.zeros_like(margins))
    pair_losses = torch.where(mask, -F.logsigmoid(margins), torch.zeros_like(margins))
    return pair_losses.sum() / (mask.sum().clamp(min=1) if denominator is None else _positive(denominator))


def score_l2(*score_tensors: torch.Tensor, denominators: tuple[float, ...] | None = None) -> torch.Tensor:
    """L2 regulariser on discriminator scores: sum over the given score sets of mean(s^2).

    The stage passes the four sets (teacher caption, teacher think, student caption, student think)
    and multiplies by its coefficient (0.001); it keeps scores near 0 since BT only fixes differences.
    An empty set contributes 0. `denominators` (one per set) replace the sets' local sizes, as in
    bradley_terry_loss.
    """
    if not score_tensors:
        raise ValueError("score_l2 needs at least one score tensor")
    if denominators is not None and len(denominators) != len(score_tensors):
        raise ValueError(f"score_l2 got {len(denominators)} denominators for {len(score_tensors)} score sets")
    total = None
    for i, scores in enumerate(score_tensors):  # a handful of tensors, not a loop over tokens
        if denominators is not None:
            term = scores.pow(2).sum() / _positive(denominators[i])
        else:
            term = scores.pow(2).mean() if scores.numel() else scores.sum()
        total = term if total is None else total + term
    return total


def _positive(denominator: float) -> float:
    # a count's share per process may be a fraction of one (1 pair over 2 processes: 0.5); none at all means
    # every sum it divides is 0, and any positive number keeps that 0 finite
    return float(denominator) if denominator > 0 else 1.0
