"""What an RL run holds per GPU, phase by phase (`prism rl --dry-run`)."""

from __future__ import annotations

import math

from stages.common.plan import memory as mp
from stages.common.plan.report import IMAGE_TOKENS, PROMPT_TOKENS, RL_LOGITS_CHUNK, common_terms, rollout_terms


def memory_plan(cfg, policy: mp.ModelShape, vllm_sleeps: bool) -> mp.MemoryPlan:
    common = common_terms(cfg)
    return mp.training_plan(
        "rl", policy=policy, micro_batch_tokens=cfg.micro_batch_tokens, logits_chunk=RL_LOGITS_CHUNK, entropy=True,
        reference=cfg.kl_coef > 0, image_patches=4 * IMAGE_TOKENS * max(1, cfg.micro_batch_tokens //
                                                                          (PROMPT_TOKENS + cfg.max_new_tokens)),
        rollout=rollout_terms(cfg, cfg.engine, math.ceil(cfg.prompts_per_step / common["world"]), cfg.rollouts_per_prompt,
                         vllm_sleeps), **common)
