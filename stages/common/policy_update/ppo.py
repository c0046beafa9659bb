"""The clipped policy update shared by `rl` and `align`: given rollout rows and their advantages, run
ppo_epochs x mini_batches optimizer steps over token-budget micro-batches.

Old logprobs are the sampling policy's (Completion.logprobs from the rollout engine). The loss is
normalised by the mini-batch's global token (or sequence) count, so micro-batching and the number of
processes do not change the gradient.

A group's n rows share one prompt, so by default each micro-batch runs its distinct prompts once and only
the responses per row (stages.common.policy_update.logprobs.shared_prefix_predictors: same values and gradients, about
(prompt + response) / response times less backbone work per row). Under gradient checkpointing it falls
back to full prompt + response rows (transformers drops the KV cache there).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from stages.common.policy_update import losses
from stages.common.policy_update.logprobs import (
    DEFAULT_CHUNK_TOKENS,
    build_policy_batch,
    make_microbatches,
    make_prefix_microbatches,
    response_logprobs,
    select_rows,
    shared_prefix_supported,
)
from stages.common.rollout import correction
from stages.common.training import runtime as training


@dataclass
class PPOSettings:
    loss: Callable = losses.ppo_clip_loss  # an Algorithm.loss (stages.rl.algorithms)
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "token-mean"
    temperature: float = 1.0
    micro_batch_tokens: int = 16384
    ppo_epochs: int = 1
    mini_batches: int = 1
    max_grad_norm: float = 1.0
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    seed: int = 0
    shared_prefix: bool = True     # run each distinct prompt once per micro-batch (see module doc)
    tis_cap: float = 0.0           # truncated importance sampling cap (0: off; stages.common.rollout.correction)
    logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS   # tokens per lm_head call (stages.common.policy_update.logprobs)


def ppo_update(settings: PPOSettings, accelerator, policy, processor, prompts, completions,
               prompt_index: list[int], advantages: torch.Tensor, reference=None, filler=None) -> dict:
    """Optimizer steps over this process's rollout rows; returns statistics averaged over the updates.
    policy is a stages.common.training.distributed.Trained.

    filler: (prompt, completion) that a process without rows (DAPO's dynamic sampling can leave one
    with no group while others have some) runs with loss weight 0, so it still joins every forward,
    backward and optimizer step the others run; its tokens count nowhere."""
    rows = len(completions)
    if training.global_sum(accelerator, rows) == 0:
        return {"update/skipped": 1.0}
    if not rows and filler is None:
        raise RuntimeError("a process without rollout rows needs a filler row to join the update")
    if not rows:
        prompts, completions, prompt_index = [filler[0]], [filler[1]], [0]
    batch = build_policy_batch(processor, prompts, [c.token_ids for c in completions], prompt_index)
    old_logp = torch.zeros(batch["response_mask"].shape)
    for i, c in enumerate(completions):
        old_logp[i, :len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    if not rows:
        advantages = torch.zeros(1)
    rollout_logp, token_weights = old_logp, None
    if settings.tis_cap > 0:
        # PPO's old policy becomes the trainer's own logprobs; the rollout engine's mismatch is corrected per
        # token by a truncated importance weight instead of leaking into the ratio
        old_logp = _trainer_logprobs(settings, accelerator, policy.model, batch)
        token_weights = correction.truncated_is_weights(old_logp, rollout_logp, batch["response_mask"],
                                                        settings.tis_cap)
    stats_sum: dict[str, float] = {}
    gap_stats: dict[str, float] = {}
    n_updates = 0
    order = list(range(rows))
    size = max(1, -(-rows // settings.mini_batches))
    for epoch in range(settings.ppo_epochs):
        random.Random(settings.seed * 31 + epoch).shuffle(order)
        for k in range(settings.mini_batches):
            mini = order[k * size:(k + 1) * size]
            # before the first optimizer step the trainer's logprobs are the old policy's: measure the gap there
            gap_vs = rollout_logp if epoch == 0 and k == 0 else None
            stats = _minibatch(settings, accelerator, policy, reference, batch, old_logp, advantages, mini,
                               token_weights=token_weights, gap_vs=gap_vs)
            stats["grad_norm"] = policy.step(settings.max_grad_norm)
            gap_stats.update({key: stats.pop(key) for key in list(stats) if key.startswith("rollout_gap")})
            for key, value in stats.items():
                if value is not None:
                    stats_sum[key] = stats_sum.get(key, 0.0) + float(value)
            n_updates += 1
    result = {f"update/{k}": v / n_updates for k, v in stats_sum.items()}
    result.update({f"rollout/{k[len('rollout_'):]}": float(v) for k, v in gap_stats.items()})
    return result


def pad_plan(micro: list[list[int]], n_global: int) -> tuple[list[list[int]], list[float]]:
    """This process's micro-batches padded to the count every process runs (n_global, the largest): the
    padding repeats row 0 with loss weight 0. Every process then runs the same number of forwards and
    backwards, which ZeRO-2 (a reduction per backward), ZeRO-3 and FSDP2 (a gather per forward) need."""
    weights = [1.0] * len(micro) + [0.0] * (n_global - len(micro))
    return micro + [[0]] * (n_global - len(micro)), weights


@torch.no_grad()
def _trainer_logprobs(settings: PPOSettings, accelerator, model, batch) -> torch.Tensor:
    """The trainer's logprobs of every response token (no gradient), [rows, T] on the CPU. Every process runs
    as many forwards (pad_plan), since ZeRO-3 and FSDP2 gather parameters in each."""
    micro = make_microbatches(batch["lengths"].tolist(), settings.micro_batch_tokens)
    out = torch.zeros(batch["response_mask"].shape)
    micro, weights = pad_plan(micro, training.global_max(accelerator, len(micro)))
    for rows, weight in zip(micro, weights):
        logp, _ = response_logprobs(model, select_rows(batch, rows), temperature=settings.temperature,
                                    shared_prefix=False, chunk_size=settings.logprob_chunk_tokens,
                                    global_chunks=training.count_sync(accelerator))
        if weight:
            out[rows, :logp.shape[1]] = logp.float().cpu()
    return out


def _minibatch(settings: PPOSettings, accelerator, policy, reference, batch, old_logp, advantages, mini,
               token_weights=None, gap_vs=None) -> dict:
    """Forward/backward of one mini-batch in token-budget micro-batches (as many on every process)."""
    model = policy.model
    sub = select_rows(batch, mini) if mini else None
    local_norm = float(losses.aggregation_normalizer(sub["response_mask"], settings.agg)) if mini else 0.0
    # DDP averages gradients over processes, so each divides by (global count / processes).
    normalizer = max(training.global_sum(accelerator, local_norm) / accelerator.num_processes, 1e-8)
    shared = settings.shared_prefix and shared_prefix_supported(model)
    if not mini:
        micro = []
    elif shared:
        micro = make_prefix_microbatches(sub["prompt_index"].tolist(), sub["prompt_lengths"].tolist(),
                                         sub["response_lengths"].tolist(), settings.micro_batch_tokens)
    else:
        micro = make_microbatches(sub["lengths"].tolist(), settings.micro_batch_tokens)
    if not micro:  # a process with no rows in this mini-batch still joins the collectives, with zero weight
        mini = [0]
        sub = select_rows(batch, mini)
    micro, weights = pad_plan(micro, training.global_max(accelerator, len(micro)))
    stats_acc: dict[str, float] = {}
    tokens = 0
    for i, (local_rows, weight) in enumerate(zip(micro, weights)):
        mb = select_rows(sub, local_rows)
        rows = [mini[r] for r in local_rows]
        mask = mb["response_mask"].to(accelerator.device)
        T = mask.shape[1]
        old = old_logp[rows, :T].to(accelerator.device)
        adv = advantages[rows].to(accelerator.device, torch.float32)
        if token_weights is not None:
            adv = adv[:, None] * token_weights[rows, :T].to(accelerator.device)
        with policy.accumulate(last=(i == len(micro) - 1)):
            logp, entropy = response_logprobs(model, mb, temperature=settings.temperature, with_entropy=True,
                                              shared_prefix=shared, chunk_size=settings.logprob_chunk_tokens,
                                              global_chunks=training.count_sync(accelerator))
            loss, stats = settings.loss(logp, old, adv, mask, clip_low=settings.clip_low, clip_high=settings.clip_high,
                                  agg=settings.agg, normalizer=normalizer)
            if gap_vs is not None:
                gap = correction.logprob_gap(gap_vs[rows, :T].to(logp.device), logp.detach(), mask)
                stats.update({f"rollout_{k}": v for k, v in gap.items()})
            if token_weights is not None:
                stats["tis_weight_mean"] = float((token_weights[rows, :T] * mask.cpu()).sum()) / max(float(mask.sum()), 1.0)
            if reference is not None:
                with torch.no_grad():
                    ref_shared = settings.shared_prefix and shared_prefix_supported(reference)
                    ref_logp, _ = response_logprobs(reference, mb, temperature=settings.temperature,
                                                    shared_prefix=ref_shared, chunk_size=settings.logprob_chunk_tokens,
                                                    global_chunks=training.count_sync(accelerator))
                kl = losses.kl_penalty(logp, ref_logp, settings.kl_kind, mask=mask)
                loss = loss + settings.kl_coef * losses.aggregate(kl, mask, settings.agg, normalizer=normalizer)
                stats["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
            policy.backward(loss * weight)
        if weight == 0.0:
            continue
        n_tok = int(mask.sum())
        tokens += n_tok
        stats["entropy"] = (entropy.detach() * mask).sum() / max(n_tok, 1)
        for key, value in stats.items():
            stats_acc[key] = stats_acc.get(key, 0.0) + float(value) * n_tok
    return training.global_token_means(accelerator, stats_acc, tokens)   # over every process's tokens
