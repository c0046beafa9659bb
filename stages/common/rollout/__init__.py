"""Rollout engines: `make_engine("auto"|"hf"|"vllm", model, processor, **opts)`.

auto picks vllm where vLLM is importable and a CUDA device exists, else hf. Asked for by name, vllm also runs
on vLLM's CPU build (vllm-cpu: slow, for tests and CI, see docs/vllm.md). The interface (RolloutPrompt,
SamplingParams, Completion, RolloutEngine) lives in base.py.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.registry import Registry
from stages.common.rollout.base import Completion, RolloutEngine, RolloutPrompt, SamplingParams

__all__ = ["Completion", "RolloutEngine", "RolloutPrompt", "SamplingParams", "make_engine", "probe_metrics",
           "vllm_usable", "check_overlap", "OVERLAP_HELP", "OVERLAP_PLAN_NOTE",
           "ENGINES", "ENGINE_NAMES"]


def vllm_usable() -> bool:
    """vLLM is installed and has a device it runs on: a CUDA GPU, or the CPU with vLLM's CPU build."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available() or vllm_cpu_build()


def vllm_preferred() -> bool:
    """auto picks vllm only on a CUDA GPU: on a CPU its start-up (a minute) outweighs what it saves."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def vllm_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


MAX_PROMPT_TOKENS = 2048   # paper: max prompt 2048 (image tokens included); the vllm engine's max_model_len adds it


# The engine modules pull in transformers (and vllm): imported when an engine is built, so that importing the
# rollout types (every stage config does, through chat) keeps `prism --help` free of torch.
# Every builder takes the run's max_new_tokens, seed and whether it is training (used by engines that need them).
def _hf_engine(model, processor, *, max_new_tokens=None, seed=0, training=False, **opts) -> RolloutEngine:
    from stages.common.rollout.hf import HFEngine

    return HFEngine(model, processor, **opts)


def _vllm_engine(model, processor, *, max_new_tokens=None, seed=0, training=False, **opts) -> RolloutEngine:
    """max_model_len = MAX_PROMPT_TOKENS + max_new_tokens (the engine caps it at the model's positions), the
    engine seed, and (training) sleep between rollouts so the updates get the GPU memory back."""
    from stages.common.rollout.vllm import VLLMEngine

    if max_new_tokens is not None:
        opts.setdefault("max_model_len", MAX_PROMPT_TOKENS + int(max_new_tokens))
    return VLLMEngine(model, processor, seed=seed, sleep_between=training, **opts)


def _vllm_missing() -> str:
    return "vLLM" if importlib.util.find_spec("vllm") is None else "a CUDA GPU (or vLLM's CPU build, vllm-cpu)"


@dataclass(frozen=True)
class Engine:
    build: Callable                   # (model, processor, **opts) -> RolloutEngine
    needs: str                        # what it runs on, for the error when it cannot
    usable: Callable[[], bool]        # can it run on this machine?
    missing: Callable[[], str]        # what this machine lacks when it cannot
    hint: str = ""
    preferred: Callable[[], bool] | None = None   # may "auto" pick it? (default: whenever usable)


# In "auto" preference order: the first usable one wins. Adding an engine: its module, a row, a test.
ENGINES: Registry[Engine] = Registry("rollout engine", "rollout engine")
ENGINES.register("vllm", Engine(_vllm_engine, "vLLM and a CUDA GPU", vllm_usable, _vllm_missing,
                                hint="pip install 'prism-vlm[gpu]' on a GPU machine, or use --engine hf",
                                preferred=vllm_preferred))
ENGINES.register("hf", Engine(_hf_engine, "transformers", lambda: True, lambda: ""))
ENGINE_NAMES = ("auto", *ENGINES.names())


def check_engine(name: str) -> str:
    """The engine `name` stands for on this machine; refused (one line) when it cannot run here. Stages call
    it before --out is touched or a model loaded, so a missing engine never leaves a half-written run."""
    if name == "auto":
        return next(n for n, engine in ENGINES.items() if (engine.preferred or engine.usable)())
    if name not in ENGINES:
        raise UsageError(f"unknown rollout engine {name!r}: registered rollout engines are auto, "
                         + ", ".join(ENGINES.names()))
    engine = ENGINES.get(name)
    if not engine.usable():
        raise PrismError(f"rollout engine {name} needs {engine.needs}, and this machine lacks {engine.missing()}",
                         hint=engine.hint or None)
    return name


OVERLAP_HELP = ("1: generate the next step's rollouts while this step updates (one step off-policy, corrected by "
                "--tis-cap; hf engine, one process or DDP); 0: off")

# --dry-run: what --overlap 1 adds that the memory plan does not model yet
OVERLAP_PLAN_NOTE = (", --overlap 1: one more copy of the policy's weights, and the rollout's KV cache held during "
                     "the update (not counted in the memory plan below)")


def check_overlap(overlap: int, tis_cap: float, engine: str, sharded: bool = False) -> None:
    """--overlap 1 (stages.common.rollout.ahead) samples one step behind the update, so it needs the truncated
    importance-sampling correction; it runs on the hf engine, with replicated weights. The config's validate
    calls this with the engine as given, the stage again with the engine `auto` resolved to and the backend."""
    if overlap not in (0, 1):
        raise UsageError(f"--overlap takes 0 or 1, not {overlap}: the rollouts run at most one step ahead")
    if not overlap:
        return
    if tis_cap <= 0:
        raise UsageError("--overlap 1 trains on rollouts sampled one step behind the update and needs the "
                         "off-policy correction", hint="add --tis-cap 2 (truncated importance sampling)")
    if engine == "vllm":
        raise UsageError("--overlap 1 is not supported with the vllm engine yet (it sleeps during the update)",
                         hint="use --engine hf, or --overlap 0")
    if sharded:
        raise UsageError("--overlap 1 is not supported with sharded parameters (FSDP2, ZeRO-3) yet",
                         hint="use DDP or one process, or --overlap 0")


def make_engine(name: str, model, processor, **opts) -> RolloutEngine:
    """The rollout engine called `name` (or the first usable one for "auto"); opts go to its constructor."""
    return ENGINES.get(check_engine(name)).build(model, processor, **opts)


def probe_metrics(engine) -> dict:
    """{"rollout/probe_gap": gap} when the engine measured one since its last weight sync (vllm's probe: engine
    vs trainer logprobs of a fixed text), else {} (hf samples from the trainer's own weights)."""
    gap = getattr(engine, "last_probe_gap", None)
    return {} if gap is None else {"rollout/probe_gap": float(gap)}
