"""What an SFT run holds per GPU, phase by phase (`prism sft --dry-run`)."""

from __future__ import annotations

from stages.common.plan import memory as mp
from stages.common.plan.report import IMAGE_TOKENS, SFT_LOGITS_CHUNK, common_terms


def memory_plan(cfg, policy: mp.ModelShape) -> mp.MemoryPlan:
    # a micro-batch is one packed row of up to micro_batch_size x max_length tokens
    tokens = cfg.micro_batch_size * cfg.max_length
    return mp.training_plan("sft", policy=policy, micro_batch_tokens=tokens, logits_chunk=SFT_LOGITS_CHUNK,
                            image_patches=4 * IMAGE_TOKENS * cfg.micro_batch_size, **common_terms(cfg))
