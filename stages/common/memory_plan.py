"""Per-GPU memory of a training stage, as a model: what each backend keeps of each model, plus activations.

Pure functions over a `ModelShape` (sizes read from a config on the meta device: no weights, no hub). The
derivations are in docs/memory-plan.md; in short, for a model with P parameters of which T train, world
size n and training dtype width w bytes:

  backend   weights          grads             fp32 master   Adam m, v          extra
  none      P w              T w               -             2 T w (param dtype)  (one process, torch AdamW)
  ddp       P w              T w               -             2 T w              + T w reducer buckets
  zero2     P w              T 4 / n           T 4 / n       T 8 / n            + 2 comm buckets (DeepSpeed)
  zero3     P w / n          T 4 / n           T 4 / n       T 8 / n            + gathered layers + buckets
  fsdp2     P 4 / n (fp32)   T 4 / n           -             T 8 / n            + gathered layers (bf16)
  offload   P w / n          T 4 / n           CPU           CPU                + gathered layers + buckets

(torch DDP/none keep Adam states in the parameters' dtype: prism loads bf16 weights on GPU, so there is
no fp32 master copy there; DeepSpeed's bf16 optimizer keeps one; accelerate's FSDP2 with mixed precision
keeps fp32 sharded parameters and computes in bf16.) A frozen model (the KL reference) is its weights,
sharded only under zero3/fsdp2/offload.

Activations per micro-batch of t tokens: per token and decoder layer, the tensors autograd saves in
Qwen3-VL's layer (RMSNorm saves an fp32 copy of its input and its normalised output; q/k norms, RoPE, sdpa
output and its reshaped copy; the SwiGLU's gate, up, act and product):
    (8 + 4w) H + (4 + 4w) Hq + (4 + 3w) Hkv + 4w I          (dense MLP; MoE: top_k (2H + 4 I_e) w)
With gradient checkpointing each layer keeps only its input (w H per token); backward recomputes one
layer at a time. Both modes add the backward working set of the MLP's gradient buffers, 3 w I per token.
Logits never exist whole (chunked logprobs): one chunk of c tokens x vocab V in w, fp32 and fp32
log-softmax, forward and backward: c V (w + 8) x 2.

A phase's peak is the sum of what is resident in it; the stage's peak is the largest phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BACKENDS = ("none", "ddp", "zero2", "zero3", "fsdp2", "offload")
SHARDED_WEIGHTS = ("zero3", "fsdp2", "offload")
# DeepSpeed defaults accelerate leaves in place: reduce_bucket_size and allgather_bucket_size, 5e8 elements each.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000
GIB = 2 ** 30


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: counts and the widths that size its activations."""

    name: str
    params: int
    vision_params: int
    hidden: int
    layers: int
    intermediate: int          # dense MLP width (or each expert's for MoE)
    q_width: int               # heads x head_dim
    kv_width: int              # kv heads x head_dim
    vocab: int
    largest_layer_params: int  # biggest decoder layer: what a sharded backend gathers at once
    experts: int = 0
    top_k: int = 0
    vision_hidden: int = 0
    vision_layers: int = 0
    vision_intermediate: int = 0
    has_lm_head: bool = True

    def trainable(self, freeze_vision: bool) -> int:
        return self.params - (self.vision_params if freeze_vision else 0)


def shape_of(model, name: str) -> ModelShape:
    """Read a ModelShape off a model (meta-device or real): counts from its parameters, widths from its config."""
    config = model.config
    text = getattr(config, "text_config", config)
    vision = getattr(config, "vision_config", None)
    params = sum(p.numel() for p in model.parameters())
    visual = _find(model, ("model.visual", "visual"))
    layers = _find(model, ("model.language_model.layers", "model.layers", "language_model.layers"))
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0) if layers else 0
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    experts = int(getattr(text, "num_experts", 0) or 0)
    return ModelShape(
        name=name, params=params, vision_params=sum(p.numel() for p in visual.parameters()) if visual else 0,
        hidden=text.hidden_size, layers=text.num_hidden_layers,
        intermediate=(getattr(text, "moe_intermediate_size", None) if experts else None) or text.intermediate_size,
        q_width=text.num_attention_heads * head_dim, kv_width=text.num_key_value_heads * head_dim,
        vocab=text.vocab_size, largest_layer_params=largest, experts=experts,
        top_k=int(getattr(text, "num_experts_per_tok", 0) or 0) if experts else 0,
        vision_hidden=getattr(vision, "hidden_size", 0) if vision else 0,
        vision_layers=getattr(vision, "depth", 0) if vision else 0,
        vision_intermediate=getattr(vision, "intermediate_size", 0) if vision else 0,
        has_lm_head=_find(model, ("lm_head",)) is not None)


def _find(model, paths):
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


# ------------------------------------------------------------------------------------- model states

def training_state(shape: ModelShape, backend: str, world: int, width: int, freeze_vision: bool = False) -> dict:
    """Bytes per GPU of a trained model's weights, grads, master weights, optimizer states and buffers."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")
    n = max(1, world) if backend not in ("none", "ddp") else 1
    p, t = shape.params, shape.trainable(freeze_vision)
    gathered = 2 * shape.largest_layer_params * width   # the layer in use and the one prefetched
    buckets = 2 * DEEPSPEED_BUCKET_ELEMENTS * width if world > 1 else 0
    if backend in ("none", "ddp"):
        return {"weights": p * width, "grads": t * width, "master": 0, "optimizer": 2 * t * width,
                "buffers": t * width if backend == "ddp" and world > 1 else 0, "cpu": 0}
    if backend == "zero2":
        return {"weights": p * width, "grads": t * 4 // n, "master": t * 4 // n if width < 4 else 0,
                "optimizer": t * 8 // n, "buffers": buckets, "cpu": 0}
    if backend == "zero3":
        return {"weights": p * width // n, "grads": t * 4 // n, "master": t * 4 // n if width < 4 else 0,
                "optimizer": t * 8 // n, "buffers": gathered + buckets, "cpu": 0}
    if backend == "fsdp2":
        return {"weights": p * 4 // n, "grads": t * 4 // n, "master": 0, "optimizer": t * 8 // n,
                "buffers": gathered, "cpu": 0}
    # offload: ZeRO-3 with parameters and optimizer (fp32 master, Adam m and v) in CPU memory
    return {"weights": 0, "grads": t * 4 // n, "master": 0, "optimizer": 0, "buffers": gathered + buckets,
            "cpu": p * width // n + t * 16 // n}


def frozen_state(shape: ModelShape, backend: str, world: int, width: int) -> int:
    """Bytes per GPU of a model that only runs forward (a KL reference)."""
    if backend in SHARDED_WEIGHTS and world > 1:
        return shape.params * width // world + 2 * shape.largest_layer_params * width
    return shape.params * width


# ------------------------------------------------------------------------------------- activations

def layer_activation_bytes_per_token(shape: ModelShape, width: int) -> int:
    """Bytes autograd keeps per token in one decoder layer (module doc)."""
    h, hq, hkv = shape.hidden, shape.q_width, shape.kv_width
    attention = (8 + 4 * width) * h + (4 + 4 * width) * hq + (4 + 3 * width) * hkv
    if shape.experts:
        mlp = shape.top_k * (2 * h + 4 * shape.intermediate) * width + shape.experts * 4
    else:
        mlp = 4 * width * shape.intermediate
    return attention + mlp


def vision_activation_bytes_per_patch(shape: ModelShape, width: int) -> int:
    """Per patch and vision block: LayerNorms (input, output), fused qkv, rotated q/k, attention output and
    its copy, fc1 output and GELU output (approximate; not checked against a measurement)."""
    return width * (10 * shape.vision_hidden + 2 * shape.vision_intermediate)


def backward_working_bytes_per_token(shape: ModelShape, width: int) -> int:
    """Gradient buffers alive while one layer runs backward: the MLP's grads of its gate, up and product."""
    return 3 * width * shape.intermediate * (shape.top_k if shape.experts else 1)


def activation_bytes(shape: ModelShape, tokens: int, width: int, checkpointing: bool, *,
                     image_patches: int = 0, train_vision: bool = True) -> int:
    """Activations of one forward+backward over `tokens` text tokens (and `image_patches` vision patches)."""
    per_layer = layer_activation_bytes_per_token(shape, width) * tokens
    working = backward_working_bytes_per_token(shape, width) * tokens
    layer_inputs = shape.layers * width * shape.hidden * tokens
    if checkpointing:
        text = layer_inputs + per_layer + working          # layer inputs, one layer recomputed, its grads
    else:
        text = shape.layers * per_layer + working
        if width < 4:   # the stages ask for hidden states: half-precision layer inputs stay alive beside fp32 copies
            text += layer_inputs
    text += (4 + width) * shape.hidden * tokens            # final norm
    vision = 0
    if image_patches and shape.vision_layers:
        per_block = vision_activation_bytes_per_patch(shape, width) * image_patches
        if not train_vision:
            vision = per_block
        elif checkpointing:
            vision = shape.vision_layers * width * shape.vision_hidden * image_patches + per_block
        else:
            vision = shape.vision_layers * per_block
    return text + vision


def logits_chunk_bytes(vocab: int, chunk_tokens: int, width: int) -> int:
    """One chunk of lm_head + log-softmax (stages.common.logprobs), forward and recomputed backward."""
    return 2 * chunk_tokens * vocab * (width + 8)


def kv_cache_bytes(shape: ModelShape, tokens: int, width: int) -> int:
    return 2 * shape.layers * shape.kv_width * width * tokens


# ------------------------------------------------------------------------------------- the plan

@dataclass
class Phase:
    name: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class MemoryPlan:
    stage: str
    backend: str
    world: int
    gpu_bytes: int
    phases: list[Phase]
    cpu_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.gpu_bytes

    def verdict(self) -> str:
        peak = self.peak
        word = "fits" if self.fits else "DOES NOT FIT"
        return (f"{word}: peak {gib(peak.total)} ({peak.name}) of {gib(self.gpu_bytes)} per GPU, "
                f"{self.backend} x {self.world}")

    def rows(self) -> list[list[str]]:
        """Table rows: one per (phase, part), then the verdict."""
        rows = []
        for phase in self.phases:
            for part, size in phase.parts.items():
                rows.append([phase.name, part, gib(size)])
            rows.append([phase.name, "total", gib(phase.total)])
        if self.cpu_bytes:
            rows.append(["(host)", "offloaded states, CPU memory per rank", gib(self.cpu_bytes)])
        rows.append(["verdict", "", self.verdict()])
        return rows


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def parse_size(text: str) -> int:
    """'80GiB', '80 GB', '141GiB', '500MiB' -> bytes (GB/MB are decimal, GiB/MiB binary; bare numbers are GiB)."""
    units = {"": GIB, "gib": GIB, "gb": 10 ** 9, "mib": 2 ** 20, "mb": 10 ** 6, "tib": 2 ** 40, "tb": 10 ** 12}
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB)") from None
    if unit not in units or value <= 0 or not math.isfinite(value):
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 80GiB)")
    return int(value * units[unit])


def _state_parts(prefix: str, state: dict) -> dict[str, int]:
    names = {"weights": "weights", "grads": "grads", "master": "fp32 master", "optimizer": "Adam m, v",
             "buffers": "comm/gather buffers"}
    return {f"{prefix} {names[k]}": v for k, v in state.items() if k in names and v}


def training_plan(stage: str, *, policy: ModelShape, backend: str, world: int, width: int, gpu_bytes: int,
                  micro_batch_tokens: int, checkpointing: bool, freeze_vision: bool = False,
                  image_patches: int = 0, logits_chunk: int = 512, reference: bool = False,
                  discriminator: ModelShape | None = None, disc_tokens: int = 0, disc_row_tokens: int = 0,
                  disc_checkpointing: bool = True, rollout: dict | None = None) -> MemoryPlan:
    """The plan of one stage. `rollout` describes the rollout phase: {"engine": "vllm", "fraction": 0.4,
    "sleep": True} or {"engine": "hf", "tokens": KV tokens resident per rank}."""
    policy_state = training_state(policy, backend, world, width, freeze_vision)
    resident = _state_parts("policy", policy_state)
    cpu = policy_state["cpu"]
    notes = []
    if reference:
        resident["reference weights"] = frozen_state(policy, backend, world, width)
    if discriminator is not None:
        disc_state = training_state(discriminator, backend, world, width)
        resident.update(_state_parts("discriminator", disc_state))
        cpu += disc_state["cpu"]
    during_update = {k: v for k, v in resident.items()}
    # Gradients exist only between a backward and its optimizer step; the rollout phase has none.
    no_grads = {k: v for k, v in resident.items() if not k.endswith(" grads")}
    phases = []
    if rollout:
        parts = dict(no_grads)
        if rollout["engine"] == "vllm":
            parts["vLLM pool (gpu_memory_utilization)"] = int(rollout["fraction"] * gpu_bytes)
        else:
            parts["hf engine KV cache"] = kv_cache_bytes(policy, rollout["tokens"], width)
        phases.append(Phase("rollout", parts))
        if rollout["engine"] == "vllm" and not rollout.get("sleep", True):
            during_update["vLLM pool (awake: not slept)"] = int(rollout["fraction"] * gpu_bytes)
            notes.append("vLLM stays awake through updates: its pool is counted in every phase")
    if discriminator is not None and disc_tokens:
        parts = dict(during_update)
        # stages.align.scoring: forward and backward one chunk of <= disc_row_tokens at a time (the chunk is
        # re-run in backward), so only one chunk's activations and its additive [rows, 1, t, t] mask are alive
        chunk = min(disc_row_tokens or disc_tokens, disc_tokens)
        parts["discriminator activations (one chunk)"] = activation_bytes(discriminator, chunk, width,
                                                                          disc_checkpointing)
        parts["scoring mask (one chunk)"] = chunk * chunk * width
        phases.append(Phase("scoring", parts))
    parts = dict(during_update)
    parts["policy activations"] = activation_bytes(policy, micro_batch_tokens, width, checkpointing,
                                                   image_patches=image_patches, train_vision=not freeze_vision)
    parts["logits chunk"] = logits_chunk_bytes(policy.vocab, min(logits_chunk, micro_batch_tokens), width)
    phases.append(Phase("update", parts))
    return MemoryPlan(stage=stage, backend=backend, world=world, gpu_bytes=gpu_bytes, phases=phases, cpu_bytes=cpu,
                      notes=notes)
