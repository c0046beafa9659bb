"""Training building blocks shared by sft, align and rl: accelerate setup, optimiser and schedule,
save/resume of trainer state, step timing, plots.

Run any stage under `accelerate launch --config_file recipes/accelerate/<ddp|fsdp2|zero2|zero3>.yaml -m
prism_cli <stage> ...` (or torchrun with PRISM_BACKEND) and the same code runs DDP, FSDP2 or DeepSpeed:
stages.common.training.distributed wraps each trained model for the launch's backend. Gradient accumulation is
done by hand (no gradient sync on all but the last micro-batch) because packed micro-batches carry
different token counts and the loss is normalised by the step's global token count, not by a
micro-batch count.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stages.common.contract import console, tracking
from stages.common.contract.errors import PrismError
from stages.common.training import distributed

TRAINER_STATE = "trainer_state.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


@dataclass
class Runtime:
    """This process's place in the run: the Accelerator (process group, ranks, trackers), the backend the
    launch asked for, and the compute precision trained models run in (their weights stay fp32)."""

    accelerator: object
    backend: distributed.Backend
    mixed_precision: str

    def prepare(self, model, make_optimizer, make_scheduler, *, max_grad_norm: float | None = None,
                name: str = "model") -> distributed.Trained:
        """make_optimizer(model) -> optimizer, make_scheduler(optimizer) -> schedule (see distributed.prepare)."""
        return distributed.prepare(self.backend, self.accelerator, model, make_optimizer, make_scheduler,
                                   mixed_precision=self.mixed_precision, max_grad_norm=max_grad_norm, name=name)


def training_dtype(requested: str) -> str:
    """The compute dtype a training stage really runs in. On a CPU prism trains in fp32: --dtype bf16/fp16
    there is said to change nothing (a warning) and recorded as fp32, not as what was asked."""
    if torch.cuda.is_available() or requested in ("auto", "fp32", "float32"):
        return requested
    console.warn(f"--dtype {requested} has no effect on a CPU: training runs in fp32 (the manifest records fp32)")
    return "fp32"


def make_runtime(compute_dtype: str = "auto", report_to: str = "none", project_dir: str | None = None) -> Runtime:
    """The backend from the launch (stages.common.training.distributed.detect_backend) and an Accelerator for the
    process group and trackers. compute_dtype is the --dtype option: bf16 on GPUs by default, as autocast
    (DDP), FSDP2's param dtype or DeepSpeed's bf16 mode, over fp32 weights (master_weights_dtype)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from stages.common.models.loading import pick_dtype

    backend = distributed.detect_backend()
    dtype = pick_dtype(compute_dtype, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    log_with = tracking.parse(report_to) or None
    # step_scheduler_with_optimizer=False: our schedules count optimizer steps of the global batch.
    # No gradient_accumulation_steps: prism accumulates by hand and normalises the loss by the step's global
    # token count; accelerate would also divide it by k (grad norms 1/k, clipping k times looser).
    # find_unused_parameters: a text-only micro-batch leaves the vision tower without gradients.
    kwargs = dict(cpu=not torch.cuda.is_available(), log_with=log_with, step_scheduler_with_optimizer=False,
                  mixed_precision=mixed if backend.kind in ("single", "ddp") else "no",
                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if project_dir:
        kwargs["project_dir"] = project_dir
    with distributed.hidden_launch_vars():   # the Accelerator runs plain DDP; prism wraps the models
        accelerator = Accelerator(**kwargs)
    if accelerator.device.type == "cpu":
        # transformers' save_pretrained imports DeepSpeed when it is installed; told the accelerator, it no
        # longer warns "Setting accelerator to CPU. If you have GPU ..." after every stage
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return Runtime(accelerator, backend, mixed)


def make_accelerator(mixed_precision: str = "auto", report_to: str = "none", project_dir: str | None = None):
    """The Accelerator alone (tests and tools that wrap a model with accelerator.prepare themselves)."""
    return make_runtime(mixed_precision, report_to, project_dir).accelerator


MASTER_WEIGHTS_DTYPE = "fp32"   # trained models load in fp32: AdamW never updates bare bf16 weights


FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)   # torch's fused AdamW kernel


def full_ndim(p: torch.Tensor) -> int:
    """A parameter's real rank: under deepspeed.zero.Init it is a 1-D placeholder whose shape is ds_shape."""
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.ndim


def build_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW; no weight decay on biases, norms and the value head's bias (the usual convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if full_ndim(p) < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW kernel (CUDA and CPU; one kernel over all tensors instead of a Python loop per
    # parameter, ~3.5x faster a step on the tiny model). Same update rule; other devices keep the default.
    params = decay + no_decay
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Multiplier of the base lr at a given step: linear warmup then constant, cosine or linear decay."""
    if kind not in ("constant", "cosine", "linear"):
        raise PrismError(f"unknown lr schedule {kind!r}", hint="use constant, cosine or linear")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * (1 - progress)

    return f


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))


def warmup_steps_from(warmup: float, total_steps: int) -> int:
    """warmup < 1 is a ratio of the total steps (paper: 0.1); >= 1 is a step count (DAPO: 10)."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def global_sum(accelerator, value: float) -> float:
    """Sum a python number over all processes (token counts for loss normalisation)."""
    return global_sums(accelerator, [value])[0]


def global_sums(accelerator, values: list[float]) -> list[float]:
    """Sum several python numbers over all processes in one all-reduce."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], device=accelerator.device, dtype=torch.float64)
    return [float(v) for v in accelerator.reduce(t, reduction="sum").tolist()]


def gather_objects(accelerator, obj) -> list:
    """Every process's picklable `obj`, in rank order (one all_gather_object)."""
    if accelerator.num_processes == 1:
        return [obj]
    gathered = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def global_token_means(accelerator, sums: dict[str, float], tokens: float) -> dict[str, float]:
    """Means over every process's tokens of token-weighted sums: what a logged per-token figure means under
    several processes. A process with no tokens contributes no keys."""
    if accelerator.num_processes > 1:
        parts = gather_objects(accelerator, (sums, tokens))
        keys = list(dict.fromkeys(key for part, _ in parts for key in part))
        sums = {key: sum(part.get(key, 0.0) for part, _ in parts) for key in keys}
        tokens = sum(count for _, count in parts)
    return {key: value / max(tokens, 1) for key, value in sums.items()}


@dataclass(frozen=True)
class Processes:
    """What a per-process loss needs of the others to be a share of the global mean: how many processes
    there are, and a sum of several numbers over all of them (one all-reduce)."""

    count: int
    sums: Callable[[list[float]], list[float]]


def processes(accelerator) -> Processes | None:
    """The run's processes for global means (stages.align.objective), or None with one process."""
    if accelerator.num_processes == 1:
        return None
    return Processes(accelerator.num_processes, lambda values: global_sums(accelerator, values))


def global_max(accelerator, value: int) -> int:
    """The largest of a python int over all processes (micro-batch and eval-batch counts)."""
    if accelerator.num_processes == 1:
        return int(value)
    t = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return int(accelerator.reduce(t, reduction="max").item())


def count_sync(accelerator):
    """global_max for this run's processes as a function of one count, or None with one process: what
    chunked code takes to run as many chunks as the busiest process (ZeRO-3 and FSDP2 gather per call)."""
    if accelerator.num_processes == 1:
        return None
    return lambda value: global_max(accelerator, value)


def loss_scale(accelerator) -> float:
    """Factor turning 'sum of token losses / global token count' into what backward should see: every
    backend averages gradients over processes (x world size undoes it). Accumulation adds no factor:
    micro-batch gradients are summed (distributed.Trained never divides by an accumulation count)."""
    return float(accelerator.num_processes)


# --------------------------------------------------------------------------------- save / resume

def save_state(accelerator, state_dir: Path, trainer_state: dict, models: list) -> None:
    """Every trained model's weights, optimiser and schedule (sharded where the backend shards), this
    process's RNG state and the trainer's own counters. Written to a temp dir and renamed so a kill
    mid-save leaves the old one."""
    import shutil

    state_dir = Path(state_dir)
    tmp = state_dir.with_name(state_dir.name + ".saving")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    for trained in models:
        trained.save(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    distributed.torch_save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        old = state_dir.with_name(state_dir.name + ".old")
        if state_dir.exists():
            os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_state(accelerator, state_dir: Path, models: list) -> dict | None:
    """Restore what save_state wrote; None when there is nothing to resume from."""
    state_dir = Path(state_dir)
    if not (state_dir / TRAINER_STATE).is_file():
        # A kill between the two renames of save_state leaves the previous state as state.old.
        old = state_dir.with_name(state_dir.name + ".old")
        if (old / TRAINER_STATE).is_file():
            state_dir = old
        else:
            return None
    for trained in models:
        trained.load(state_dir)
    rng_file = state_dir / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((state_dir / TRAINER_STATE).read_text())


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_model(accelerator, trained, processor, out_dir: Path) -> None:
    """The policy in HF format; gathers sharded (FSDP2 / ZeRO-3) weights onto the main process."""
    state_dict = trained.full_state_dict()
    if accelerator.is_main_process:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        trained.module.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(out_dir)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------- timing

class StepTimer:
    """Wall time of named phases within a step (rollout / score / update ...)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            with console.phase(name):  # a log line printed mid-step names the phase
                yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return {f"time/{k}": v for k, v in out.items()}


def rank_fingerprints(accelerator, trained) -> list[float] | None:
    """A cheap fingerprint of the weights on every process (sum and sum of squares, float64), for
    backends that replicate the weights (DDP, ZeRO-0/1/2); None where they are sharded (FSDP2, ZeRO-3).
    Raises if the processes disagree: replicas that drift apart are a bug, never a result."""
    if not trained.backend.replicates_weights:
        return None
    params = [p.detach() for p in trained.module.parameters()]
    local = torch.stack([sum(p.double().sum() for p in params), sum(p.double().pow(2).sum() for p in params)])
    everyone = accelerator.gather(local.to(accelerator.device)[None]).cpu()   # [processes, 2]
    sums = everyone[:, 0].tolist()
    if not torch.allclose(everyone, everyone[0:1].expand_as(everyone), rtol=1e-9, atol=1e-9):
        raise PrismError(f"model replicas differ across processes (weight sums {sums}): gradient sync is broken")
    return sums
