"""Per-response advantages and reward shaping for the RLVR stage (GRPO / DAPO / GSPO).

Everything here is a pure function on 1-D tensors with one entry per response. Responses are grouped
by prompt through `group_ids` (a 1-D integer tensor, or a list of ints or strings such as uids); the
groups need not be contiguous or numbered from 0.

Group normalisation convention (shared with the alignment advantage, docs/method.md):

    GN(x)_i = (x_i - mean_g) / (std_g + eps)        g = group of response i
    std_g   = sample standard deviation (n - 1 denominator, as torch.std)
    a group of one response uses mean_g = 0 and std_g = 1 (so GN(x)_i = x_i / (1 + eps))

A group of n >= 2 identical values gets exactly 0 (the formula's value; we guarantee it instead of
leaving a rounding residue divided by eps).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

GroupIds = torch.Tensor | Sequence[int] | Sequence[str]


def group_index(group_ids: GroupIds, num_items: int, device: torch.device | str | None = None):
    """Map arbitrary group ids to dense group numbers.

    Returns (index, num_groups, keys): `index` is a LongTensor [num_items] on `device` with values in
    [0, num_groups); `keys[g]` is the original id of group g (sorted ids for integer input, first
    appearance order for string input).
    """
    if not isinstance(group_ids, torch.Tensor):
        ids = list(group_ids)
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            group_ids = torch.tensor(ids, dtype=torch.long)
        else:
            # uid strings (as rollout code often carries them): number them by first appearance
            first_seen: dict = {}
            index_list = [first_seen.setdefault(i, len(first_seen)) for i in ids]
            if len(index_list) != num_items:
                raise ValueError(f"group_ids has {len(index_list)} entries, expected {num_items}")
            index = torch.tensor(index_list, dtype=torch.long, device=device)
            return index, len(first_seen), list(first_seen)
    if group_ids.dim() != 1 or group_ids.numel() != num_items:
        raise ValueError(f"group_ids must be 1-D with {num_items} entries, got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point():
        raise ValueError("group_ids must be integers (or a list of ids), not floats")
    keys, index = torch.unique(group_ids, sorted=True, return_inverse=True)
    return index.to(device=device, dtype=torch.long), int(keys.numel()), keys


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps group means exact for float32/bf16 inputs; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _as_1d(values, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(values, device=device)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per response), got shape {tuple(t.shape)}")
    return t


def _group_normalize(values: torch.Tensor, index: torch.Tensor, num_groups: int,
                     normalize_std: bool, eps: float) -> torch.Tensor:
    """GN over dense group numbers; returns the work dtype (caller casts)."""
    x = values.to(_work_dtype(values.device))
    zeros = torch.zeros(num_groups, dtype=x.dtype, device=x.device)
    count = zeros.index_add(0, index, torch.ones_like(x))
    mean = zeros.index_add(0, index, x) / count.clamp(min=1)
    deviation = x - mean[index]
    variance = zeros.index_add(0, index, deviation * deviation) / (count - 1).clamp(min=1)
    std = variance.sqrt()

    singleton = count == 1
    mean = torch.where(singleton, torch.zeros_like(mean), mean)
    std = torch.where(singleton, torch.ones_like(std), std)
    group_max = torch.full_like(zeros, -torch.inf).scatter_reduce(0, index, x, "amax")
    group_min = torch.full_like(zeros, torch.inf).scatter_reduce(0, index, x, "amin")
    identical = (group_max == group_min) & ~singleton

    centred = x - mean[index]
    normalized = centred / (std[index] + eps) if normalize_std else centred
    return torch.where(identical[index], torch.zeros_like(normalized), normalized)


def group_normalized_advantages(rewards, group_ids: GroupIds, normalize_std: bool = True,
                                eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage: A_i = (r_i - mean_g) / (std_g + eps), or r_i - mean_g without std scaling.

    std is the sample std (n - 1); a group of one uses mean 0 and std 1 (see module docstring), so
    its advantage is r_i / (1 + eps) (r_i with normalize_std=False). Groups of identical rewards get 0.
    Returns float32 [N] on the rewards' device; the stage broadcasts it over the response tokens.
    """
    rewards = _as_1d(rewards, "rewards")
    index, num_groups, _ = group_index(group_ids, rewards.numel(), rewards.device)
    return _group_normalize(rewards, index, num_groups, normalize_std, eps).to(torch.float32)


def overlong_penalty(response_lengths, max_response_length: int, buffer_length: int = 4096,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward of each response.

    With L = response length, L_max = max_response_length, B = min(buffer_length, L_max):

        R(L) = 0                                   if L <= L_max - B
             = -penalty_factor * (L - (L_max - B)) / B   if L_max - B < L <= L_max
             = -penalty_factor                     if L > L_max

    so the penalty is 0 exactly at L_max - B, reaches -penalty_factor exactly at L_max and stays there
    beyond (a truncated response cannot be longer than L_max, but lengths computed elsewhere may be).
    A buffer longer than L_max is shortened to L_max (the ramp starts at length 0 rather than
    punishing even an empty response); buffer 0 is a hard step: 0 up to L_max, -penalty_factor above.
    Returns float32 with the shape of `response_lengths`.
    """
    if max_response_length <= 0:
        raise ValueError(f"max_response_length must be positive, got {max_response_length}")
    if buffer_length < 0:
        raise ValueError(f"buffer_length must be >= 0, got {buffer_length}")
    lengths = torch.as_tensor(response_lengths).to(torch.float32)
    buffer = min(buffer_length, max_response_length)
    if buffer == 0:
        return torch.where(lengths > max_response_length, -float(penalty_factor), 0.0)
    ramp_start = max_response_length - buffer
    fraction_into_buffer = ((lengths - ramp_start) / buffer).clamp(min=0.0, max=1.0)
    return -penalty_factor * fraction_into_buffer


class DynamicSamplingKeep(NamedTuple):
    """Result of `dynamic_sampling_keep`.

    response_mask: bool [N], True for responses of kept groups (index the batch with it).
    group_mask:    bool [G], True for kept groups, ordered like `group_keys`.
    group_keys:    the original group ids, one per group (tensor, or list for string ids).
    num_kept_groups / num_groups: ints for logging.
    """

    response_mask: torch.Tensor
    group_mask: torch.Tensor
    group_keys: torch.Tensor | list
    num_kept_groups: int
    num_groups: int


def dynamic_sampling_keep(acc, group_ids: GroupIds) -> DynamicSamplingKeep:
    """DAPO dynamic sampling: drop prompt groups whose `acc` values are all equal (all 0 or all 1).

    Such groups have zero group-normalised advantage and only dilute the batch. Equality is exact
    (acc is 0/1 from the reward function). A group of one response is kept: under the group-of-one
    convention its advantage is its reward, not 0, so it still carries signal.
    """
    acc = _as_1d(acc, "acc")
    index, num_groups, keys = group_index(group_ids, acc.numel(), acc.device)
    x = acc.to(_work_dtype(acc.device))
    empty = torch.empty(num_groups, dtype=x.dtype, device=x.device)
    group_max = torch.full_like(empty, -torch.inf).scatter_reduce(0, index, x, "amax")
    group_min = torch.full_like(empty, torch.inf).scatter_reduce(0, index, x, "amin")
    count = torch.zeros_like(empty).index_add(0, index, torch.ones_like(x))
    group_mask = (group_max != group_min) | (count == 1)
    return DynamicSamplingKeep(
        response_mask=group_mask[index],
        group_mask=group_mask,
        group_keys=keys,
        num_kept_groups=int(group_mask.sum()),
        num_groups=num_groups,
    )
