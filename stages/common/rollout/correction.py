"""The rollout engine samples from its own copy of the policy (vLLM kernels, bf16, its own weight sync), so
its logprobs differ from the trainer's. Two pure pieces over [rows, tokens] tensors and a response mask:

- `logprob_gap`: how far apart they are (mean |difference| and the k3 KL estimate of KL(rollout || trainer)),
  recorded every step; a stale engine after sleep/wake shows up here first (trl#5312 saw 0.20 with sleep
  on vs 0.015 off).
- `truncated_is_weights`: truncated importance sampling (Yao et al., 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"): the tokens were drawn from pi_rollout, the objective is under
  pi_trainer(old), so each token's loss is weighted by min(pi_trainer / pi_rollout, cap). Off by default.
"""

from __future__ import annotations

import torch


def logprob_gap(rollout_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean absolute logprob difference and k3 KL(rollout || trainer) over masked tokens."""
    mask = mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {"gap_mean_abs": 0.0, "gap_max_abs": 0.0, "gap_k3": 0.0}
    diff = (trainer_logp.float() - rollout_logp.float())[mask]
    k3 = torch.exp(diff) - 1 - diff          # log r with r = pi_trainer / pi_rollout, sampled under pi_rollout
    return {"gap_mean_abs": float(diff.abs().mean()), "gap_max_abs": float(diff.abs().max()),
            "gap_k3": float(k3.mean())}


def truncated_is_weights(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Per-token weights min(exp(trainer - rollout), cap), 0 outside the mask; no gradient flows through."""
    if cap <= 0:
        raise ValueError(f"the truncation cap must be > 0, got {cap}")
    log_ratio = (trainer_logp.detach().float() - rollout_logp.detach().float()).clamp(max=torch.log(
        torch.tensor(float(cap))).item())
    return torch.exp(log_ratio) * mask.float()
