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

Beside the model states, every phase holds the CUDA context and NCCL's buffers, and (between rollouts) what
a sleeping vLLM engine keeps; a ZeRO-2 backward holds a bf16 gradient shard beside the fp32 one; a tied
embedding's two full gradients (embedding and lm_head) are alive while autograd sums them; the policy
update's entropy keeps two fp32 [chunk, vocab] buffers. vLLM's pool is gpu_memory_utilization x the card's
usable memory, allocated from the driver on wake: PyTorch's cached reserve is given back first
(torch.cuda.empty_cache() before the wake), or the rollout phase holds the largest other phase's reserve.

A phase's peak is the sum of what is resident in it; the stage's peak is the largest phase. Where each
number comes from (formula, DeepSpeed's estimators, a measurement): docs/memory-plan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stages.common.models.parts import DECODER_LAYERS, LM_HEAD, VISION_TOWER, first_attribute

BACKENDS = ("none", "ddp", "zero2", "zero3", "fsdp2", "offload")
SHARDED_WEIGHTS = ("zero3", "fsdp2", "offload")
# DeepSpeed defaults accelerate leaves in place: reduce_bucket_size and allgather_bucket_size, 5e8 elements each.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000
GIB = 2 ** 30
# Not derived here: figures of issue #28's reading of a GPU run, to be measured (docs/memory-plan.md).
CUDA_CONTEXT_BYTES = int(1.2 * GIB)      # CUDA context, cuBLAS workspace and NCCL communicator buffers per rank
VLLM_ASLEEP_BYTES = int(1.0 * GIB)       # what a vLLM engine keeps on the GPU at sleep level 1 (graphs, buffers)
CONTEXT_PART = "CUDA context + NCCL"      # the plan's name for CUDA_CONTEXT_BYTES


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
    tied_embeddings: bool = False   # lm_head shares the embedding matrix [vocab, hidden]

    def trainable(self, freeze_vision: bool) -> int:
        return self.params - (self.vision_params if freeze_vision else 0)


def shape_of(model, name: str) -> ModelShape:
    """Read a ModelShape off a model (meta-device or real): counts from its parameters, widths from its config."""
    config = model.config
    text = getattr(config, "text_config", config)
    vision = getattr(config, "vision_config", None)
    params = sum(p.numel() for p in model.parameters())
    visual = first_attribute(model, VISION_TOWER)
    layers = first_attribute(model, DECODER_LAYERS)
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
        has_lm_head=first_attribute(model, LM_HEAD) is not None,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings",
                                                                                        False)))


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
        # DeepSpeed's bf16 optimizer reduces into a gradient shard in the training dtype besides the fp32 one
        return {"weights": p * width, "grads": t * 4 // n, "grads_low": t * width // n if width < 4 else 0,
                "master": t * 4 // n if width < 4 else 0, "optimizer": t * 8 // n, "buffers": buckets, "cpu": 0}
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
    """One chunk of lm_head + log-softmax (stages.common.policy_update.logprobs), forward and recomputed backward."""
    return 2 * chunk_tokens * vocab * (width + 8)


def entropy_buffers_bytes(vocab: int, chunk_tokens: int) -> int:
    """The entropy of one logits chunk (stages.common.policy_update.logprobs._chunk_logprobs): softmax(z) and its product with
    z, both fp32 [chunk, vocab]."""
    return 2 * chunk_tokens * vocab * 4


def tied_embedding_grad_bytes(shape: ModelShape, width: int) -> int:
    """A tied embedding gets two full [vocab, hidden] gradients in one backward (the embedding's and lm_head's)
    that autograd sums: both are alive at once, whatever the backend shards afterwards."""
    return 2 * shape.vocab * shape.hidden * width if shape.tied_embeddings and shape.has_lm_head else 0


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


STATE_NAMES = {"weights": "weights", "grads": "grads", "grads_low": "bf16 grad shard", "master": "fp32 master",
               "optimizer": "Adam m, v", "buffers": "comm/gather buffers"}
GRAD_STATES = ("grads", "grads_low")   # alive from a backward to its optimizer step only


def _state_parts(prefix: str, state: dict, grads: bool = True) -> dict[str, int]:
    return {f"{prefix} {STATE_NAMES[k]}": v for k, v in state.items()
            if k in STATE_NAMES and v and (grads or k not in GRAD_STATES)}


def training_plan(stage: str, *, policy: ModelShape, backend: str, world: int, width: int, gpu_bytes: int,
                  micro_batch_tokens: int, checkpointing: bool, freeze_vision: bool = False,
                  image_patches: int = 0, logits_chunk: int = 512, entropy: bool = False, reference: bool = False,
                  discriminator: ModelShape | None = None, disc_tokens: int = 0, disc_row_tokens: int = 0,
                  disc_checkpointing: bool = True, warmup_pair_tokens: int = 0,
                  rollout: dict | None = None) -> MemoryPlan:
    """The plan of one stage, phase by phase (warmup, rollout, scoring, update; those the stage has).

    `rollout` describes the rollout phase: {"engine": "vllm", "fraction": 0.4, "sleep": True, "empty_cache": True}
    or {"engine": "hf", "tokens": KV tokens resident per rank}. `warmup_pair_tokens` > 0: the align
    discriminator's warmup, its pairs scored in chunks of <= disc_row_tokens.

    Long because it is the list of phases with what each holds, one block per phase."""
    policy_state = training_state(policy, backend, world, width, freeze_vision)
    disc_state = training_state(discriminator, backend, world, width) if discriminator is not None else None
    cpu = policy_state["cpu"] + (disc_state["cpu"] if disc_state else 0)
    vllm = rollout is not None and rollout["engine"] == "vllm"
    sleeps = vllm and rollout.get("sleep", True)
    pool = int(rollout["fraction"] * gpu_bytes) if vllm else 0

    def resident(policy_grads: bool, disc_grads: bool) -> dict[str, int]:
        """What stays allocated by PyTorch in a phase: model states (grads only where a backward runs)."""
        parts = _state_parts("policy", policy_state, policy_grads)
        if reference:
            parts["reference weights"] = frozen_state(policy, backend, world, width)
        if disc_state:
            parts.update(_state_parts("discriminator", disc_state, disc_grads))
        return parts

    def disc_chunk(tokens: int) -> dict[str, int]:
        # stages.align.scoring: forward and backward one chunk of <= disc_row_tokens at a time (the chunk is
        # re-run in backward), so only one chunk's activations and its additive [rows, 1, t, t] mask are alive
        chunk = min(disc_row_tokens or tokens, tokens)
        return {"discriminator activations (one chunk)": activation_bytes(discriminator, chunk, width,
                                                                          disc_checkpointing),
                "scoring mask (one chunk)": chunk * chunk * width}

    torch_phases: list[tuple[str, dict[str, int]]] = []   # (name, PyTorch's allocations)
    if discriminator is not None and warmup_pair_tokens:
        # the policy has not stepped yet: no policy grads; the discriminator trains on pairs, chunk by chunk
        torch_phases.append(("warmup", {**resident(False, True), **disc_chunk(warmup_pair_tokens)}))
    if discriminator is not None and disc_tokens:
        torch_phases.append(("scoring", {**resident(True, True), **disc_chunk(disc_tokens)}))
    update = resident(True, True)
    update["policy activations"] = activation_bytes(policy, micro_batch_tokens, width, checkpointing,
                                                    image_patches=image_patches, train_vision=not freeze_vision)
    chunk = min(logits_chunk, micro_batch_tokens)
    update["logits chunk"] = logits_chunk_bytes(policy.vocab, chunk, width)
    if entropy:
        update["entropy buffers (logits chunk)"] = entropy_buffers_bytes(policy.vocab, chunk)
    if tied_embedding_grad_bytes(policy, width):
        update["tied embedding grads (embedding + lm_head)"] = tied_embedding_grad_bytes(policy, width)
    torch_phases.append(("update", update))

    always = {CONTEXT_PART: CUDA_CONTEXT_BYTES}
    between_rollouts = {**always, **({"vLLM asleep": VLLM_ASLEEP_BYTES} if sleeps else {})}
    notes = []
    if vllm and not sleeps:
        between_rollouts["vLLM pool (awake: not slept)"] = pool
        notes.append("vLLM stays awake through updates: its pool is counted in every phase")
    phases = [Phase(name, {**between_rollouts, **parts}) for name, parts in torch_phases]
    if rollout:
        parts = dict(always)
        if vllm and sleeps and not rollout.get("empty_cache", True):
            # the caching allocator still holds the largest reserve of the step (vLLM cannot use it)
            name, largest = max(((n, sum(p.values())) for n, p in torch_phases), key=lambda x: x[1])
            parts[f"PyTorch cached reserve (peak of {name}; no empty_cache before the wake)"] = largest
            notes.append("torch.cuda.empty_cache() does not run before vLLM wakes: PyTorch's reserve stays")
        else:
            parts.update(resident(False, False))
        if vllm:
            parts[f"vLLM pool ({rollout['fraction']:g} x usable memory)"] = pool
        else:
            parts["hf engine KV cache"] = kv_cache_bytes(policy, rollout["tokens"], width)
        phases.insert(1 if phases[0].name == "warmup" else 0, Phase("rollout", parts))
    return MemoryPlan(stage=stage, backend=backend, world=world, gpu_bytes=gpu_bytes, phases=phases, cpu_bytes=cpu,
                      notes=notes)
