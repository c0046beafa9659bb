"""Distribution backends: one object per trained model, the same on a CPU with gloo as on GPUs.

Users launch as before (`accelerate launch --config_file recipes/accelerate/<ddp|fsdp2|zero2|zero3>.yaml -m
prism_cli ...`, or `torchrun ... -m prism_cli ...` with PRISM_BACKEND=ddp|fsdp2|zero2|zero3). The launch
decides the backend (`detect_backend`); prism then wraps every trained model itself (`prepare`), one engine
per model, instead of handing them to `accelerator.prepare`:

- single / ddp: accelerate's own wrapping (DDP with unused-parameter handling, autocast), fp32 weights.
- fsdp2: torch's `fully_shard` on every decoder layer and the root, bf16 compute over fp32 sharded weights.
- deepspeed: `deepspeed.initialize` per model (ZeRO 0-3); bf16 weights with DeepSpeed's fp32 master copy.

Why not accelerate for all of them: accelerate 1.15 takes one model per Accelerator under DeepSpeed and
FSDP2 (align trains two), ignores its FSDP plugin on a CPU and starts one process for DeepSpeed on a CPU,
so the sharded paths could never be tested without GPUs. `deepspeed.initialize` and `fully_shard` run with
two CPU processes over gloo, so the conformance suite (tests/test_distributed.py) runs the real code.
The Accelerator still owns the process group, ranks and trackers (it is built as plain DDP for that).

A `Trained` model hides what differs between backends: accumulation without sync, backward, clip + step,
the full state dict for saving, and resumable state. Gradients are averaged over processes by every
backend, and the loss the stages hand to `backward` is already normalised by the global count, so
callers multiply by `world` (see training.loss_scale) and nothing else.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.common.contract.errors import PrismError, UsageError

KINDS = ("single", "ddp", "fsdp2", "deepspeed")
BACKEND_ENV = "PRISM_BACKEND"
NAMED = {"ddp": ("ddp", 0), "fsdp2": ("fsdp2", 0), "zero0": ("deepspeed", 0), "zero1": ("deepspeed", 1),
         "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
# accelerate launch exports these for its DeepSpeed / FSDP configs; the process runtime must not see them
# (prism wraps the models itself), so they are hidden while the Accelerator is built.
LAUNCH_VARS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


@dataclass(frozen=True)
class Backend:
    kind: str                              # one of KINDS
    zero_stage: int = 0                    # deepspeed only
    world: int = 1
    offload_optimizer: str = "none"        # deepspeed only: none | cpu | nvme
    offload_param: str = "none"
    config_file: str | None = None         # a DeepSpeed JSON whose other settings are kept
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"zero{self.zero_stage}" if self.kind == "deepspeed" else self.kind

    @property
    def shards_parameters(self) -> bool:
        """Parameters gathered on every forward: every rank must run the same number of forwards."""
        return self.kind == "fsdp2" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def replicates_weights(self) -> bool:
        return self.world > 1 and not self.shards_parameters


def detect_backend(env=None) -> Backend:
    """The backend the launch asked for: PRISM_BACKEND, else the accelerate launch config, else DDP when
    there are several processes, else a single process."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    named = env.get(BACKEND_ENV, "").strip().lower()
    if named:
        if named not in NAMED:
            raise UsageError(f"{BACKEND_ENV}={named!r} is not a backend", hint=f"use one of {', '.join(NAMED)}")
        kind, stage = NAMED[named]
        return Backend(kind if world > 1 or kind != "ddp" else "single", stage, world)
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        cfg_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        return Backend("deepspeed", int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")), world,
                       offload_optimizer=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
                       offload_param=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
                       config_file=None if cfg_file in ("", "none") else cfg_file)
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise UsageError("FSDP version 1 is not supported", hint="use recipes/accelerate/fsdp2.yaml "
                                                                      "(fsdp_version: 2) or a DeepSpeed config")
        return Backend("fsdp2", 0, world)
    return Backend("ddp" if world > 1 else "single", 0, world)


@contextmanager
def hidden_launch_vars():
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def shard_layer_classes(model) -> set[str]:
    """Module classes that become their own FSDP2 unit: the language model's decoder layers. The vision
    tower stays in the root unit, so a text-only micro-batch (vision tower skipped) runs the same
    collectives as an image one on every rank."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {n for n in names if "Vision" not in n and "Visual" not in n}


def torch_save(obj, path: Path) -> None:
    """torch.save, with a full disk reported as the OSError it is: torch's zip writer turns a short write into
    "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", which names neither the disk nor
    the file."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        stats = os.statvfs(Path(path).parent)
        if "unexpected pos" in str(e) and stats.f_bavail * stats.f_frsize < (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


class Trained:
    """One trained model under one backend, with its optimizer and lr schedule."""

    def __init__(self, backend: Backend, accelerator, model, optimizer, scheduler, module, name: str, engine=None):
        self.backend, self.accelerator, self.optimizer, self.scheduler = backend, accelerator, optimizer, scheduler
        self.model = model        # what forwards go through (the DDP wrapper, or the sharded module itself)
        self.module = module      # the Hugging Face model itself
        self.engine = engine      # DeepSpeed's engine (backward, step, checkpoints)
        self.name = name

    # ---- one optimizer step over several micro-batches

    @contextmanager
    def accumulate(self, last: bool):
        """Gradients of all but the last micro-batch stay local (no all-reduce / reduce-scatter)."""
        kind = self.backend.kind
        if kind == "deepspeed":
            self.engine.set_gradient_accumulation_boundary(last)
            yield
        elif kind == "fsdp2":
            self.model.set_requires_gradient_sync(last)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        elif last or kind == "single":
            yield
        else:
            with self.accelerator.no_sync(self.model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.backend.kind == "deepspeed":
            # engine.forward would clear ZeRO's "backward seen" flag; forwards bypass it (see prepare), and
            # without the reset ZeRO-3 drops all but the first micro-batch's gradients (grad norm halved).
            clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
            if clear is not None:
                clear()
            self.engine.backward(loss)
        else:
            self.accelerator.backward(loss)

    def step(self, max_grad_norm: float | None) -> float | None:
        """Clip to max_grad_norm (the norm of the whole step's gradient), step, schedule, zero; returns the
        pre-clip norm. DeepSpeed clips inside its step (gradient_clipping was set from max_grad_norm)."""
        kind, norm = self.backend.kind, None
        if kind == "deepspeed":
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.step()
            value = self.engine.get_global_grad_norm()
            norm = float(value) if value is not None else None
        else:
            if kind == "fsdp2":
                norm = fsdp2_clip_grad_norm(self.module, max_grad_norm)
            elif max_grad_norm and max_grad_norm > 0:
                value = self.accelerator.clip_grad_norm_(self.module.parameters(), max_grad_norm)
                norm = float(value) if value is not None else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ---- saving

    def full_state_dict(self) -> dict | None:
        """The whole model's weights on the main process (None elsewhere); a collective on sharded backends."""
        kind = self.backend.kind
        if kind == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        elif kind == "deepspeed" and self.backend.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        elif self.accelerator.is_main_process:
            # replicated weights (single, DDP, ZeRO-0/1/2): the main process's copy is the model; the others
            # copied the whole model to the CPU for nothing (a full CPU copy per GPU at 4B+)
            sd = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        else:
            return None
        return sd if self.accelerator.is_main_process else None

    def save(self, directory: Path) -> None:
        """Resumable state (weights, optimizer, schedule), sharded where the backend shards. Collective."""
        directory = Path(directory) / self.name
        kind = self.backend.kind
        if kind == "deepspeed":
            self.engine.save_checkpoint(str(directory), tag="prism", save_latest=False)
        elif kind == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory))
        elif self.accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            torch_save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       directory / "state.pt")
        if self.accelerator.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            torch_save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        directory = Path(directory) / self.name
        if not directory.is_dir():
            raise PrismError(f"resumable state {directory} is missing", hint="rerun with --overwrite")
        kind = self.backend.kind
        if kind == "deepspeed":
            self.engine.load_checkpoint(str(directory), tag="prism", load_lr_scheduler_states=False)
        elif kind == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(state, checkpoint_id=str(directory))
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])
        else:
            saved = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
            self.module.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))


def fsdp2_clip_grad_norm(module, max_grad_norm: float | None) -> float | None:
    """Total gradient norm over the sharded (DTensor) gradients of every rank, then clip."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    if max_grad_norm and max_grad_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in module.parameters() if p.grad is not None],
                                             max_grad_norm, total)
    return float(total)


def deepspeed_config(backend: Backend, max_grad_norm: float | None, mixed_precision: str) -> dict:
    """The engine's config: prism owns batch shape, accumulation (manual boundaries) and clipping; the
    launch config owns ZeRO stage, offload and anything else a user's JSON sets."""
    cfg: dict = {}
    if backend.config_file:
        try:
            cfg = json.loads(Path(backend.config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"DeepSpeed config {backend.config_file} is unreadable: {e}") from None
    zero = dict(cfg.get("zero_optimization", {}))
    zero.setdefault("stage", backend.zero_stage)
    for key, device in (("offload_optimizer", backend.offload_optimizer), ("offload_param", backend.offload_param)):
        if device not in ("", "none") and key not in zero:
            zero[key] = {"device": device}
    cfg.update({
        "zero_optimization": zero,
        # prism feeds its own micro-batches and marks the accumulation boundary itself: one micro-batch per
        # engine step as far as DeepSpeed's bookkeeping goes, so it never rescales the loss.
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": backend.world,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    })
    if mixed_precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif mixed_precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    return cfg


def vision_tower_everywhere(model, backend: Backend, accelerator) -> int:
    """DeepSpeed: a micro-batch without images skips the vision tower, so on that rank its parameters get no
    gradient while another rank's do; ZeRO-2's gradient buckets then hold different parameters on different
    ranks (measured: silently wrong gradients, or a gloo size mismatch) and ZeRO-3's gathers differ.

    So each forward of the vision-language backbone asks, with one scalar all-reduce, whether any rank has
    images. If some do, a rank without runs its vision tower on a blank 2x2-patch image right after the token
    embedding (where a rank with images runs it: ZeRO-3 gathers in the same order) and adds 0 x the result to
    the embeddings: the same values, and a zero gradient for every vision parameter, so every rank reduces
    and gathers the same parameters. No rank with images, or all of them: nothing changes. Forwards without
    gradients under ZeRO-0/1/2 run no collectives and are left alone. Returns the number of backbones hooked."""
    hooked = 0
    for module in model.modules():
        # the vision-language backbone (Qwen3VLModel and kin): the module that calls its vision tower
        if not (hasattr(module, "visual") and hasattr(module, "get_image_features")):
            continue
        pending = {"blank": False}

        def check(mod, args, kwargs, pending=pending):
            pending["blank"] = False
            if not torch.is_grad_enabled() and backend.zero_stage < 3:
                return None
            has = kwargs.get("pixel_values") is not None
            flag = torch.tensor([1.0 if has else 0.0], device=accelerator.device)
            any_images = accelerator.reduce(flag, reduction="sum").item() > 0   # on every rank, images or not
            pending["blank"] = any_images and not has
            return None

        def add_blank_image(embedding, args, output, backbone=module, pending=pending):
            if not pending["blank"]:
                return None
            pending["blank"] = False
            pixels, grid = blank_image(backbone.config.vision_config, output.device)
            features = backbone.get_image_features(pixels, grid)
            tensors = [features.pooler_output, *(getattr(features, "deepstack_features", None) or [])]
            zero = sum(t.float().sum() for t in _flat_tensors(tensors)) * 0.0
            return output + zero.to(output.dtype)

        module.register_forward_pre_hook(check, with_kwargs=True)
        module.get_input_embeddings().register_forward_hook(add_blank_image)
        hooked += 1
    return hooked


def blank_image(vision_config, device) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values and image_grid_thw of the smallest image the vision tower takes: one merge window of
    patches (spatial_merge_size^2), all zeros."""
    merge = int(getattr(vision_config, "spatial_merge_size", 2))
    channels = int(getattr(vision_config, "in_channels", 3))
    temporal = int(getattr(vision_config, "temporal_patch_size", 2))
    patch = int(vision_config.patch_size)
    pixels = torch.zeros(merge * merge, channels * temporal * patch * patch, device=device)
    return pixels, torch.tensor([[1, merge, merge]], device=device)


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _flat_tensors(item)]
    return []


def prepare(backend: Backend, accelerator, model, make_optimizer, make_scheduler, *, mixed_precision: str = "no",
            max_grad_norm: float | None = None, name: str = "model") -> Trained:
    """Wrap one trained model (fp32 weights as loaded) for this backend, with the optimizer
    make_optimizer(model) and the schedule make_scheduler(optimizer). Factories, because fully_shard
    replaces the parameters: an optimizer built before it would update tensors nobody uses."""
    kind = backend.kind
    if kind == "deepspeed":
        import deepspeed

        if backend.world > 1:
            vision_tower_everywhere(model, backend, accelerator)
        optimizer = make_optimizer(model)
        scheduler = make_scheduler(optimizer)   # the client optimizer's param groups are DeepSpeed's too

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(backend, max_grad_norm, mixed_precision),
            dist_init_required=False)
        # Forwards go through the module: ZeRO-3's gathering lives in module hooks and engine.backward runs
        # the backward prologue itself (Trained.backward resets the flag engine.forward would), while
        # engine.forward's output hooks break on model outputs with a field named `values` (the
        # discriminator's) by calling outputs.values().
        return Trained(backend, accelerator, engine.module, ds_optimizer, scheduler, engine.module, name, engine)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(accelerator.device.type, (backend.world,))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else \
            MixedPrecisionPolicy()
        layers = shard_layer_classes(model)
        for module in model.modules():
            if type(module).__name__ in layers:
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        optimizer = make_optimizer(model)
        return Trained(backend, accelerator, model, optimizer, make_scheduler(optimizer), model, name)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    return Trained(backend, accelerator, wrapped, optimizer, scheduler, model, name)


def lockstep(accelerator, backend: Backend):
    """For the rollout engine: whether any rank still has rows to decode (ranks with sharded parameters
    must run the same number of forwards). None when the backend does not need it."""
    if not backend.shards_parameters or backend.world == 1:
        return None

    def any_alive(local: bool) -> bool:
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    return any_alive
