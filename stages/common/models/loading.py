"""Load a policy and its processor from any checkpoint spec, on any hardware.

One code path for the tiny model on a CPU and Qwen3-VL-4B on GPUs: the dtype (bf16 on GPU, fp32 on CPU)
and attention (flash_attention_2 when installed on a GPU, else sdpa) are chosen here, never by callers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from stages.common.contract.checkpoint import CkptSpec, resolve
from stages.common.contract.errors import PrismError
from stages.common.models.parts import VISION_TOWER, first_attribute


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def device_memory_bytes(device: torch.device | None = None) -> int:
    """Memory of the device a process trains on: the GPU's total, or on a CPU the machine's physical memory
    (what the memory plan's verdicts are checked against at launch)."""
    device = device or default_device()
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def pick_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    device = device or default_device()
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise PrismError(f"unknown dtype {dtype!r}", hint="use auto, bf16, fp16 or fp32")
    return table[dtype]


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant. transformers 5.24 renamed the method and warns on
    the old name; older releases have only the old one. The old one calls the new one: the same checkpoints."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_decoder_layers(model) -> int:
    """torch.compile (inductor) each of the policy's text decoder layers; returns how many. Opt-in (sft's
    --compile): on the tiny model on one CPU thread an SFT step ran ~1.3x faster (benchmarks/compile_probe.py,
    docs/compile.md), after a one-time compile of tens of seconds.

    Per layer rather than the whole model: the layers share one compiled graph (same code, parameters as
    inputs), while the model's own forward (masks, rotary, the vision merge) would break the graph.
    dynamic=True: a padded batch's length changes every step, and one shape-generic graph serves them all
    (static shapes recompile per length until dynamo's limit, then run eagerly)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not layers:
        raise PrismError(f"cannot compile {type(model).__name__}: no text decoder layers found (get_decoder().layers)")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def pick_attention(attn: str = "auto", device: torch.device | None = None) -> str:
    device = device or default_device()
    if attn != "auto":
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise PrismError("attention flash_attention_2 was asked for but flash-attn is not installed",
                             hint="pip install 'prism-vlm[flash]' --no-build-isolation, or use --set attn=sdpa")
        return attn
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def as_spec(ckpt: str | CkptSpec) -> CkptSpec:
    """The resolved spec, with the tiny model built if it names one (the one place it is built)."""
    spec = ckpt if isinstance(ckpt, CkptSpec) else resolve(ckpt)
    if spec.kind == "tiny":
        # imported here: loading a real checkpoint never loads the tiny factories (the architecture test checks)
        from stages.common.models import seeing_base
        from stages.common.world import tiny
        try:
            tiny.ensure(spec.ref, builder=seeing_base.provide if spec.ref == "tiny-seeing" else None)
        except OSError as e:  # the cache is PRISM_HOME's, not --out's: say which directory cannot be written
            home = tiny.cache_root().parent
            raise PrismError(f"cannot build the {spec.ref} model in PRISM_HOME ({home}): "
                             f"{e.strerror or e.__class__.__name__}",
                             hint="set PRISM_HOME to a writable directory (default ~/.cache/prism)") from None
    return spec


def load_processor(ckpt: str | CkptSpec, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's processor (tokenizer + image processor + chat template); pixel bounds honoured."""
    from transformers import AutoProcessor, ProcessorMixin

    path = as_spec(ckpt).model_path
    try:
        processor = AutoProcessor.from_pretrained(path)
    except OSError as e:
        hint = None if os.path.isdir(path) else (f"{path} is not a local directory, so it was looked up as a "
                                                 "Hugging Face hub id; check the path")
        raise PrismError(f"cannot load the processor of {path}: {str(e).splitlines()[0]}", hint=hint) from None
    # Without torchvision, AutoProcessor silently falls back to a bare tokenizer; a VLM can't train on that.
    if not isinstance(processor, ProcessorMixin) or not hasattr(processor, "image_processor"):
        raise PrismError(f"{path} did not load as a multimodal processor (got {type(processor).__name__})",
                         hint="is torchvision installed and importable?")
    if min_pixels or max_pixels:
        ip = processor.image_processor
        size = dict(getattr(ip, "size", None) or {})
        if min_pixels:
            size["shortest_edge"] = int(min_pixels)
            if hasattr(ip, "min_pixels"):
                ip.min_pixels = int(min_pixels)
        if max_pixels:
            size["longest_edge"] = int(max_pixels)
            if hasattr(ip, "max_pixels"):
                ip.max_pixels = int(max_pixels)
        ip.size = size
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    check_tokenizer_matches_model(tok, path)
    return processor


# Special tokens whose ids the model's config fixes: a tokenizer that maps them elsewhere was not the model's.
_CONFIG_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def check_tokenizer_matches_model(tokenizer, path: str) -> None:
    """Refuse a tokenizer that cannot belong to the model at `path` (replaced tokenizer files): more tokens
    than embedding rows (ids past the table would fail deep inside a forward pass), or vision special
    tokens at other ids than the model's config expects. Embeddings padded beyond the tokenizer (Qwen's
    151936 rows for ~151.7k tokens) are normal. Reads config.json only, no weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return  # load_policy reports an unreadable config, with the checkpoint's name
    text = getattr(config, "text_config", None) or config
    rows = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None)
    n = len(tokenizer)
    if rows and n > rows:
        raise PrismError(f"the tokenizer in {path} does not match its model: {n:,} tokens but the embedding table "
                         f"has {rows:,} rows (vocabulary size mismatch)",
                         hint="the tokenizer files were replaced; restore the ones saved with the model")
    for key, token in _CONFIG_TOKENS.items():
        want = getattr(config, key, None)
        if want is None:
            continue
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise PrismError(f"the tokenizer in {path} does not match its model: {token} is id {got}, the model's "
                             f"config says {key} = {want} (vocabulary mismatch)",
                             hint="the tokenizer files were replaced; restore the ones saved with the model")


def load_policy(ckpt: str | CkptSpec, *, dtype: str = "auto", attn: str = "auto", device: torch.device | None = None,
                gradient_checkpointing: bool = False, freeze_vision: bool = False, train: bool = True,
                compile_layers: bool = False):
    """The policy as an image-text-to-text model, on `device`, in the dtype/attention for that device;
    compile_layers: its text decoder layers compiled (compile_decoder_layers)."""
    from transformers import AutoModelForImageTextToText

    spec = as_spec(ckpt)
    device = device or default_device()
    if os.path.isdir(spec.model_path):
        check_safetensors(Path(spec.model_path))
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            spec.model_path, dtype=pick_dtype(dtype, device), attn_implementation=pick_attention(attn, device))
    except OSError as e:
        raise PrismError(f"cannot load model weights from {spec.describe()}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # safetensors raises its own SafetensorError for a broken file
        if "safetensor" not in type(e).__name__.lower():
            raise
        raise PrismError(f"cannot load model weights from {spec.describe()}: {str(e).splitlines()[0]}") from None
    model.to(device)
    if freeze_vision:
        freeze_vision_tower(model)
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if compile_layers:
        compile_decoder_layers(model)
    model.train(train)
    return model


def check_safetensors(folder: Path) -> None:
    """Each *.safetensors file's header is readable and its tensors fit in the file; a truncated or
    partly copied file is named here instead of failing inside transformers. Reads headers only."""
    import json
    import struct

    for f in sorted(folder.glob("*.safetensors")):
        size = f.stat().st_size
        problem = None
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                problem = f"{size} bytes, shorter than a safetensors header"
            else:
                (n,) = struct.unpack("<Q", head)
                if 8 + n > size:
                    problem = f"its header claims {n:,} bytes but the file has {size:,}"
                else:
                    try:
                        header = json.loads(fh.read(n))
                        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                                  default=0)
                    except (ValueError, KeyError, TypeError, IndexError):
                        problem = "its header is not valid safetensors JSON"
                    else:
                        if 8 + n + end > size:
                            problem = f"truncated: its tensors need {8 + n + end:,} bytes, the file has {size:,}"
        if problem:
            raise PrismError(f"weights file {f} is damaged ({problem})",
                             hint="copy or download it again; a partial copy is the usual cause")


def vision_tower(model):
    tower = first_attribute(model, VISION_TOWER)
    if tower is not None:
        return tower
    raise PrismError(f"{type(model).__name__} has no vision tower to freeze")


def freeze_vision_tower(model) -> None:
    for p in vision_tower(model).parameters():
        p.requires_grad_(False)


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


