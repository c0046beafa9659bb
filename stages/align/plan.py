"""What an align run holds per GPU, phase by phase (`prism align --dry-run`): the policy, the discriminator
scoring its token budget, the warmup pairs and the rollout engine; and the settings the plan decides
(`--disc-grad-checkpointing auto`, `--disc-layout auto`)."""

from __future__ import annotations

import math

from stages.common.plan import memory as mp
from stages.common.plan.report import IMAGE_TOKENS, PROMPT_TOKENS, RL_LOGITS_CHUNK, common_terms, rollout_terms
from stages.common.training.groups import group_layout

DISC_PHASES = ("warmup", "scoring")   # the phases the discriminator's activations peak in


def disc_scoring_tokens(prompts_per_rank: int, rollouts: int, max_new_tokens: int, row_tokens: int) -> int:
    """Tokens one rank's discriminator runs in a game step: each row repeats its group's prompt and holds
    segments up to the row budget; a response's caption and think together are at most max_new_tokens, and
    the teacher's pair is scored with every group (or every slice of a split group)."""
    segment_tokens = (rollouts + 1) * max_new_tokens
    room = max(1, row_tokens - PROMPT_TOKENS)
    rows = math.ceil(segment_tokens / room)
    return prompts_per_rank * (rows * PROMPT_TOKENS + segment_tokens)


def memory_plan(cfg, policy: mp.ModelShape, disc: mp.ModelShape, vllm_sleeps: bool,
                disc_checkpointing: bool | None = None, gpu_bytes: int | None = None) -> mp.MemoryPlan:
    """The plan at the config's settings; disc_checkpointing / gpu_bytes override the config's (the resolved
    --disc-grad-checkpointing, the device's real memory)."""
    common = common_terms(cfg)
    if gpu_bytes is not None:
        common["gpu_bytes"] = gpu_bytes
    if disc_checkpointing is None:
        disc_checkpointing = cfg.disc_gradient_checkpointing != "off"
    layout = group_layout(cfg.prompts_per_step, cfg.rollouts_per_prompt, common["world"])  # the launch's split
    row = cfg.disc_row_tokens or (PROMPT_TOKENS + cfg.rollouts_per_prompt * cfg.max_new_tokens)
    # a warmup pair: the prompt, the teacher's and the student's caption + think (each <= max_new_tokens)
    pair_tokens = PROMPT_TOKENS + 2 * cfg.max_new_tokens if cfg.warmup_steps > 0 else 0
    return mp.training_plan(
        "align", policy=policy, micro_batch_tokens=cfg.micro_batch_tokens, logits_chunk=RL_LOGITS_CHUNK, entropy=True,
        image_patches=4 * IMAGE_TOKENS * max(1, cfg.micro_batch_tokens // (PROMPT_TOKENS + cfg.max_new_tokens)),
        discriminator=disc, disc_tokens=disc_scoring_tokens(layout.prompts_per_rank, layout.rollouts_per_rank,
                                                            cfg.max_new_tokens, row),
        disc_row_tokens=row, disc_checkpointing=disc_checkpointing,
        warmup_pair_tokens=pair_tokens,
        rollout=rollout_terms(cfg, cfg.engine, layout.prompts_per_rank, layout.rollouts_per_rank, vllm_sleeps), **common)


def needs_disc_checkpointing(plan_without: mp.MemoryPlan) -> bool:
    """Whether the discriminator must be checkpointed: a phase its activations peak in does not fit without."""
    return any(p.total > plan_without.gpu_bytes for p in plan_without.phases if p.name in DISC_PHASES)


def resolve_disc_settings(checkpointing: str, layout: str, plan_without: mp.MemoryPlan | None) -> tuple[bool, str]:
    """(checkpoint the discriminator?, scoring layout) from the options: auto checkpointing is on only where the
    plan without it does not fit (plan_without: that plan; an explicit prefix layout turns it off, as the
    layout cannot run checkpointed); auto layout is prefix unless checkpointed, then shared (the prefix layout
    reads the prompt's KV cache, which checkpointing drops)."""
    if checkpointing == "auto":
        on = layout != "prefix" and plan_without is not None and needs_disc_checkpointing(plan_without)
    else:
        on = checkpointing == "on"
    if layout == "auto":
        layout = "shared" if on else "prefix"
    return on, layout
