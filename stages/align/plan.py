"""What an align run holds per GPU, phase by phase (`prism align --dry-run`): the policy, the discriminator
scoring its token budget, the warmup pairs and the rollout engine."""

from __future__ import annotations

import math

from stages.common.plan import memory as mp
from stages.common.plan.report import IMAGE_TOKENS, PROMPT_TOKENS, RL_LOGITS_CHUNK, common_terms, rollout_terms
from stages.common.training.groups import group_layout


def disc_scoring_tokens(prompts_per_rank: int, rollouts: int, max_new_tokens: int, row_tokens: int) -> int:
    """Tokens one rank's discriminator runs in a game step: each row repeats its group's prompt and holds
    segments up to the row budget; a response's caption and think together are at most max_new_tokens, and
    the teacher's pair is scored with every group (or every slice of a split group)."""
    segment_tokens = (rollouts + 1) * max_new_tokens
    room = max(1, row_tokens - PROMPT_TOKENS)
    rows = math.ceil(segment_tokens / room)
    return prompts_per_rank * (rows * PROMPT_TOKENS + segment_tokens)


def memory_plan(cfg, policy: mp.ModelShape, disc: mp.ModelShape, vllm_sleeps: bool) -> mp.MemoryPlan:
    common = common_terms(cfg)
    layout = group_layout(cfg.prompts_per_step, cfg.rollouts_per_prompt, common["world"])  # the launch's split
    row = cfg.disc_row_tokens or (PROMPT_TOKENS + cfg.rollouts_per_prompt * cfg.max_new_tokens)
    # a warmup pair: the prompt, the teacher's and the student's caption + think (each <= max_new_tokens)
    pair_tokens = PROMPT_TOKENS + 2 * cfg.max_new_tokens if cfg.warmup_steps > 0 else 0
    return mp.training_plan(
        "align", policy=policy, micro_batch_tokens=cfg.micro_batch_tokens, logits_chunk=RL_LOGITS_CHUNK, entropy=True,
        image_patches=4 * IMAGE_TOKENS * max(1, cfg.micro_batch_tokens // (PROMPT_TOKENS + cfg.max_new_tokens)),
        discriminator=disc, disc_tokens=disc_scoring_tokens(layout.prompts_per_rank, layout.rollouts_per_rank,
                                                            cfg.max_new_tokens, row),
        disc_row_tokens=row, disc_checkpointing=cfg.disc_gradient_checkpointing,
        warmup_pair_tokens=pair_tokens,
        rollout=rollout_terms(cfg, cfg.engine, layout.prompts_per_rank, layout.rollouts_per_rank, vllm_sleeps), **common)
