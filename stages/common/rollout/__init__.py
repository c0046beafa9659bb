"""Rollout engines: `make_engine("auto"|"hf"|"vllm", model, processor, **opts)`.

auto picks vllm where vLLM is importable and a CUDA device exists, else hf. The interface (RolloutPrompt,
SamplingParams, Completion, RolloutEngine) lives in base.py.
"""

from __future__ import annotations

import importlib.util

from prism_cli.errors import PrismError, UsageError
from stages.common.rollout.base import Completion, RolloutEngine, RolloutPrompt, SamplingParams

ENGINE_NAMES = ("auto", "hf", "vllm")

__all__ = ["Completion", "RolloutEngine", "RolloutPrompt", "SamplingParams", "make_engine", "vllm_usable",
           "ENGINE_NAMES"]


def vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


MAX_PROMPT_TOKENS = 2048   # paper: max prompt 2048 (image tokens included); the vllm engine's max_model_len adds it


def make_engine(name: str, model, processor, *, max_new_tokens: int | None = None, seed: int = 0,
                training: bool = False, **opts) -> RolloutEngine:
    """The rollout engine called `name` for `model`; opts go to the engine's constructor. For vllm:
    max_model_len = MAX_PROMPT_TOKENS + max_new_tokens, the engine seed, and (training) sleep between
    rollouts so the updates get the GPU memory back."""
    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown rollout engine {name!r}", hint="use auto, hf or vllm")
    if name == "auto":
        name = "vllm" if vllm_usable() else "hf"
    if name == "vllm":
        if not vllm_usable():
            raise PrismError("rollout engine vllm needs vLLM and a CUDA GPU, and this machine lacks "
                             + ("vLLM" if importlib.util.find_spec("vllm") is None else "a CUDA GPU"),
                             hint="pip install 'prism-vlm[gpu]' on a GPU machine, or use --set rollout_engine=hf")
        from stages.common.rollout.vllm import VLLMEngine

        if max_new_tokens is not None:
            opts.setdefault("max_model_len", MAX_PROMPT_TOKENS + int(max_new_tokens))
        return VLLMEngine(model, processor, seed=seed, sleep_between=training, **opts)
    from stages.common.rollout.hf import HFEngine

    return HFEngine(model, processor, **opts)
