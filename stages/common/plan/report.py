"""`--dry-run` memory plans of the training stages: shapes read offline, the stage's config turned into the
inputs of stages.common.plan.memory, and the table with its verdict.

Offline: a model's shape comes from its config.json (a local directory or prism checkpoint), from the
published config of a known Qwen3-VL hub id (stages.common.models.shapes), or from a `qwen3vl-*-shape` spec; the
model is built on the meta device, so no weight is read or allocated.
"""

from __future__ import annotations

import os

from stages.common.contract import checkpoint, console
from stages.common.contract.checkpoint import CkptSpec
from stages.common.contract.errors import PrismError, UsageError
from stages.common.models import shapes
from stages.common.plan import memory as mp

# Assumptions the plan states rather than reads from data (docs/memory-plan.md):
PROMPT_TOKENS = 2048         # paper: max prompt 2048 (image tokens included)
IMAGE_TOKENS = 1024          # merged vision tokens per sample (about 1 MP at patch 16, merge 2); patches = 4x
VLLM_FRACTION = 0.4          # stages.common.rollout.vllm's gpu_memory_utilization
VLLM_EMPTIES_CACHE = True    # stages.common.rollout.vllm empties PyTorch's cache before every wake
SFT_LOGITS_CHUNK = 1024      # stages.sft.loss.summed_nll
RL_LOGITS_CHUNK = 512        # stages.common.policy_update.logprobs.DEFAULT_CHUNK_TOKENS


def config_of(spec: CkptSpec):
    """The model config of a checkpoint spec, offline."""
    from transformers import AutoConfig

    name = spec.ref if spec.kind == "shape" else shapes.HUB_IDS.get(spec.ref) if spec.kind == "hub" else None
    if name:
        return shapes.shape_config(name)
    try:
        return AutoConfig.from_pretrained(spec.model_path)
    except (OSError, ValueError) as e:
        raise PrismError(f"cannot read the config of {spec.describe()}: {str(e).splitlines()[0]}",
                         hint="--dry-run reads config.json only: give a local directory, a prism checkpoint, "
                              "a qwen3vl-*-shape spec or a Qwen3-VL hub id it knows") from None


def policy_shape(spec: CkptSpec) -> mp.ModelShape:
    return mp.shape_of(shapes.meta_model(config_of(spec)), spec.ref)


def discriminator_shape(spec: CkptSpec, *, upcycle: bool, dense: bool, num_experts: int, top_k: int,
                        aux_loss_coef: float) -> mp.ModelShape:
    import torch

    from stages.common.models.discriminator import Qwen3VLDiscriminator, Qwen3VLMoeDiscriminator, moe_config_from_dense

    config = config_of(spec)
    if upcycle and not dense:
        config = moe_config_from_dense(config, num_experts, top_k, aux_loss_coef)
    cls = Qwen3VLMoeDiscriminator if config.model_type == "qwen3_vl_moe" else Qwen3VLDiscriminator
    with torch.device("meta"):
        model = cls._from_config(config)
    return mp.shape_of(model, f"discriminator ({spec.ref})")


def align_shapes(cfg, policy_spec: CkptSpec, disc_source: tuple[str, CkptSpec]):
    """(policy, discriminator) shapes of an align run; disc_source is ("reuse" | "upcycle", spec)."""
    how, spec = disc_source
    if how == "reuse" and spec.kind == "prism":
        spec = CkptSpec(ref=str(spec.path / "discriminator"), kind="hf", path=spec.path / "discriminator")
    disc = discriminator_shape(spec, upcycle=how == "upcycle", dense=cfg.disc_dense, num_experts=cfg.num_experts,
                               top_k=cfg.top_k, aux_loss_coef=cfg.aux_loss_coef)
    return policy_shape(policy_spec), disc


def backend_of(name: str, world: int = 1) -> str:
    """The backend a launch of `world` processes uses: as given, or (auto) what the launch itself would detect
    (stages.common.training.distributed.detect_backend: PRISM_BACKEND, else accelerate's launch environment, else DDP
    when there are several processes), so an unknown PRISM_BACKEND is refused here as at launch."""
    if name != "auto":
        return name
    from stages.common.training.distributed import detect_backend

    backend = detect_backend(dict(os.environ, WORLD_SIZE=str(world)))
    if backend.kind == "deepspeed":
        if backend.offload_optimizer not in ("", "none") or backend.offload_param not in ("", "none"):
            return "offload"
        # ZeRO-0/1 keep whole gradients: planned as DDP (over-counts ZeRO-1's sharded optimizer states)
        return {3: "zero3", 2: "zero2"}.get(backend.zero_stage, "ddp")
    return {"single": "none"}.get(backend.kind, backend.kind)


def world_of(n: int) -> int:
    return n if n > 0 else int(os.environ.get("WORLD_SIZE", "1"))


def width_of(dtype: str) -> int:
    """Bytes per element of the training dtype on a GPU (auto: bf16)."""
    return {"auto": 2, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}[dtype]


def check_plan_options(gpu_memory: str, backend: str, world_size: int) -> int:
    """Validate the plan's options (every stage's validate() calls this); returns the GPU memory in bytes."""
    try:
        size = mp.parse_size(gpu_memory)
    except ValueError as e:
        raise UsageError(f"config key 'gpu_memory': {e}") from None
    if backend != "auto" and backend not in mp.BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", hint="auto, " + ", ".join(mp.BACKENDS))
    if world_size < 0:
        raise UsageError("world_size must be >= 0 (0: the launch's WORLD_SIZE)")
    return size


def check_output_if_set(cfg, stage: str) -> None:
    """The launch's --out check (read-only), for a dry run that names an --out. The plan's own options are
    compared as a launch records them (their defaults), so planning a resume does not look like a change."""
    if not cfg.out:
        return
    import dataclasses

    from stages.common.contract.config import to_dict

    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in ("gpu_memory", "backend",
                                                                                 "world_size")}
    checkpoint.check_output(cfg.out, stage, to_dict(dataclasses.replace(cfg, **defaults)), cfg.overwrite,
                            cfg.resume)


def common_terms(cfg) -> dict:
    """The plan's terms every stage's config sets the same way (the hardware settings)."""
    world = world_of(cfg.world_size)
    return dict(backend=backend_of(cfg.backend, world), world=world, width=width_of(cfg.dtype),
                gpu_bytes=mp.parse_size(cfg.gpu_memory), checkpointing=cfg.gradient_checkpointing,
                freeze_vision=cfg.freeze_vision)


def rollout_terms(cfg, engine: str, prompts_per_rank: int, rollouts_per_rank: int, sleeps: bool) -> dict:
    """The rollout engine's share of a plan (rl and align)."""
    if engine in ("auto", "vllm"):
        return {"engine": "vllm", "fraction": VLLM_FRACTION, "sleep": sleeps, "empty_cache": VLLM_EMPTIES_CACHE}
    # the hf engine keeps one prompt KV per group and each row's own generated tokens
    return {"engine": "hf", "tokens": prompts_per_rank * (PROMPT_TOKENS + rollouts_per_rank * cfg.max_new_tokens)}


def print_plan(title: str, plan: mp.MemoryPlan) -> None:
    """The table, phase by phase, each phase's total and the verdict; a plan that does not fit is refused
    (one line, exit 1) after the table, as a launch would run out of memory in its peak phase."""
    console.print_table(f"{title}: memory per GPU ({plan.backend} x {plan.world})", ["phase", "what", "size"],
                        plan.rows())
    for note in plan.notes:
        console.out.print(f"note: {note}")
    console.out.print("peak per phase: " + ", ".join(f"{p.name} {mp.gib(p.total)}" for p in plan.phases))
    if not plan.fits:
        peak = plan.peak
        raise PrismError(f"the memory plan does not fit: its {peak.name} phase needs {mp.gib(peak.total)} of "
                         f"{mp.gib(plan.gpu_bytes)} per GPU ({plan.backend} x {plan.world})",
                         hint="more GPUs (--world-size), a sharding backend (zero3, fsdp2), smaller micro-batches, "
                              "or --gpu-memory of a larger card")


def parameter_summary(shape: mp.ModelShape) -> str:
    def count(n: int) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

    return (f"{count(shape.params)} parameters (vision {count(shape.vision_params)}"
            + (f", {shape.experts} experts top-{shape.top_k}" if shape.experts else "") + ")")
