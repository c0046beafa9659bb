"""The PRISM discriminator: a Qwen3-VL backbone with a scalar value head (docs/method.md, "The discriminator").

Construction (`upcycle`) is sparse upcycling of a dense Qwen3-VL into a Qwen3-VL-MoE: every decoder MLP
becomes `num_experts` experts (top-k routed, renormalised), each a copy of the dense MLP plus Gaussian
noise; the router starts random (normal, router_std); the vision tower, attention, embeddings and norms
are copied unchanged. With noise 0 the MoE backbone computes exactly what the dense one does (whatever
the router picks, top-k weights sum to 1 over identical experts).

The value head is Linear(hidden, 1) on the final (normed) hidden state: per-token values [B, T]; a
segment's score is the value at its last token (stages.align.scoring). It starts small and random,
weight normal(0, 0.1 / sqrt(hidden)), bias 0: the normed hidden state has unit RMS, so initial scores
are about N(0, 0.1^2) -- near the L2-regularised operating point -- while, unlike a zero init, the
backbone gets gradient from the first step.

Ablations (docs/method.md, "Ablations"): `dense=True` keeps the dense Qwen3-VL backbone (no
upcycling); `text_only=True` withholds images when scoring. Both are recorded in the config under
`prism_discriminator`, so a reloaded discriminator keeps them:

    {"variant": "moe" | "dense", "text_only": bool, "value_head_std": float, "base": "<dense spec>"}

Files: the Hugging Face save_pretrained layout (config.json + safetensors) plus the dense base's
processor, saved alongside by `save_discriminator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
import torch.nn as nn
from transformers import initialization as hf_init
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
    Qwen3VLMoeModel,
    Qwen3VLMoePreTrainedModel,
    load_balancing_loss_func,
)

from stages.common.contract.checkpoint import CkptSpec
from stages.common.contract.errors import PrismError
from stages.common.models.loading import as_spec, default_device, load_processor, pick_attention, pick_dtype

CONFIG_KEY = "prism_discriminator"
VALUE_HEAD_GAIN = 0.1
# The shared-prompt scoring layout needs a custom 4-D attention mask, which sdpa and eager accept and
# flash_attention_2 does not; "auto" therefore means sdpa for the discriminator on every device.
DEFAULT_ATTENTION = "sdpa"

# Config keys that describe a config object rather than the model; never carried from dense to MoE.
_CONFIG_META_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype",
                     "torch_dtype", "id2label", "label2id", "output_hidden_states", "output_attentions",
                     "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type")


@dataclass
class DiscriminatorOutput(ModelOutput):
    """token_values: float32 [B, T], the value head at every token. aux_loss: the router load-balancing loss
    (MoE with output_router_logits only; unscaled -- multiply by `aux_loss_coef(model)`). Not named
    `values`: a field of that name shadows the mapping method ModelOutput.values(), which DDP and
    DeepSpeed call on a model's output (DDP: "TypeError: 'Tensor' object is not callable")."""

    token_values: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    cache: Any = None       # the backbone's KV cache, with use_cache=True (the prefix scoring layout's prompt pass)


def disc_settings(config) -> dict:
    """The discriminator's own settings from its config (CONFIG_KEY), with defaults for a config that has none."""
    stored = getattr(config, CONFIG_KEY, None) or {}
    hidden = config.get_text_config().hidden_size
    return {"variant": stored.get("variant", "moe" if config.model_type == "qwen3_vl_moe" else "dense"),
            "text_only": bool(stored.get("text_only", False)),
            "value_head_std": float(stored.get("value_head_std", VALUE_HEAD_GAIN / math.sqrt(hidden))),
            **{k: v for k, v in stored.items() if k not in ("variant", "text_only", "value_head_std")}}


def is_text_only(model) -> bool:
    return disc_settings(getattr(model, "module", model).config)["text_only"]


def aux_loss_coef(model) -> float:
    """The router aux-loss coefficient (0 for the dense variant)."""
    config = getattr(model, "module", model).config
    if config.model_type != "qwen3_vl_moe":
        return 0.0
    return float(config.text_config.router_aux_loss_coef)


def _init_value_head(head: nn.Linear, config, generator: torch.Generator | None = None) -> None:
    # hf_init functions skip tensors already loaded from a checkpoint (_is_hf_initialized)
    hf_init.normal_(head.weight, mean=0.0, std=disc_settings(config)["value_head_std"], generator=generator)
    if head.bias is not None:
        hf_init.zeros_(head.bias)


def _value_forward(model, input_ids, attention_mask, position_ids, pixel_values, image_grid_thw,
                   mm_token_type_ids, inputs_embeds, output_router_logits, aux_loss_mask,
                   kwargs) -> DiscriminatorOutput:
    """Shared by both discriminator classes: backbone -> value head -> (aux loss)."""
    if pixel_values is not None and disc_settings(model.config)["text_only"]:
        # a text-only discriminator that saw pixels would silently stop being the ablation
        raise ValueError("this discriminator is text-only (prism_discriminator.text_only); pass no pixel_values")
    is_moe = model.config.model_type == "qwen3_vl_moe"
    want_router = bool(output_router_logits) and is_moe
    if want_router:
        kwargs["output_router_logits"] = True
    kwargs.setdefault("use_cache", False)  # scoring and training never decode: no KV cache
    outputs = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                          mm_token_type_ids=mm_token_type_ids, inputs_embeds=inputs_embeds, **kwargs)
    hidden = outputs.last_hidden_state
    values = model.value_head(hidden).squeeze(-1).float()
    aux_loss, router_logits = None, None
    if want_router:
        router_logits = outputs.router_logits
        if aux_loss_mask is None and attention_mask is not None and attention_mask.dim() == 2:
            aux_loss_mask = attention_mask
        text = model.config.text_config
        aux_loss = load_balancing_loss_func(router_logits, text.num_experts, text.num_experts_per_tok, aux_loss_mask)
    cache = (outputs["cache"] if "cache" in outputs else outputs.get("past_key_values")) if kwargs["use_cache"] else None
    return DiscriminatorOutput(token_values=values, aux_loss=aux_loss, router_logits=router_logits, cache=cache)


def router_aux_loss(model, router_logits: list[tuple[torch.Tensor, ...]], token_masks: list[torch.Tensor]) -> torch.Tensor | None:
    """The router load-balancing loss over the real tokens of several forwards at once (each forward's
    per-layer logits [tokens, experts] and its real-token mask, any shape with that many elements): the same
    value as one forward over those tokens. None for the dense variant or without router logits."""
    inner = getattr(model, "module", model)
    if inner.config.model_type != "qwen3_vl_moe" or not router_logits:
        return None
    layers = len(router_logits[0])
    kept = tuple(torch.cat([logits[layer][mask.reshape(-1).bool().to(logits[layer].device)]
                            for logits, mask in zip(router_logits, token_masks)])
                 for layer in range(layers))
    text = inner.config.text_config
    return load_balancing_loss_func(kept, text.num_experts, text.num_experts_per_tok, None)


class _ValueHeadModel:
    """What both discriminator classes share: a multimodal backbone `model` (the causal LM's tensor names)
    plus `value_head`. Mixed in ahead of the Hugging Face pretrained-model class, which it defers to."""

    def _add_value_head(self, config, backbone) -> None:
        self.model = backbone
        self.value_head = nn.Linear(config.text_config.hidden_size, 1)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "value_head", None):
            _init_value_head(module, self.config)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, pixel_values=None,
                image_grid_thw=None, mm_token_type_ids=None, inputs_embeds=None,
                output_router_logits: bool | None = None, aux_loss_mask: torch.Tensor | None = None,
                **kwargs) -> DiscriminatorOutput:
        """Per-token values [B, T]. `attention_mask` may be a 2-D padding mask or a prepared 4-D mask
        (the shared-prompt layout); with a 4-D mask pass `aux_loss_mask` (2-D, real tokens) for the aux loss."""
        return _value_forward(self, input_ids, attention_mask, position_ids, pixel_values, image_grid_thw,
                              mm_token_type_ids, inputs_embeds, output_router_logits, aux_loss_mask, kwargs)


class Qwen3VLMoeDiscriminator(_ValueHeadModel, Qwen3VLMoePreTrainedModel):
    """Qwen3-VL-MoE multimodal backbone + `value_head`. Loading a causal-LM checkpoint into it matches the
    backbone, drops lm_head and reports value_head missing."""

    def __init__(self, config: Qwen3VLMoeConfig):
        super().__init__(config)
        self._add_value_head(config, Qwen3VLMoeModel(config))


class Qwen3VLDiscriminator(_ValueHeadModel, Qwen3VLPreTrainedModel):
    """The dense ablation: Qwen3-VL multimodal backbone + `value_head` (no experts, no aux loss)."""

    def __init__(self, config):
        super().__init__(config)
        self._add_value_head(config, Qwen3VLModel(config))


Discriminator = Qwen3VLMoeDiscriminator | Qwen3VLDiscriminator
_CLASS_BY_MODEL_TYPE = {"qwen3_vl_moe": Qwen3VLMoeDiscriminator, "qwen3_vl": Qwen3VLDiscriminator}


# ------------------------------------------------------------------------------------------ construction

def _plain_config_dict(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_META_KEYS}


def moe_config_from_dense(dense_config, num_experts: int = 4, top_k: int = 2,
                          aux_loss_coef: float = 0.01) -> Qwen3VLMoeConfig:
    """The Qwen3-VL-MoE config of a dense Qwen3-VL config: same sizes, every decoder MLP sparse, each expert
    as wide as the dense MLP (moe_intermediate_size = intermediate_size)."""
    if not 1 <= top_k <= num_experts:
        raise PrismError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    text = _plain_config_dict(dense_config.text_config)
    text.update(moe_intermediate_size=text["intermediate_size"], num_experts=num_experts,
                num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
                router_aux_loss_coef=aux_loss_coef, output_router_logits=False)
    return Qwen3VLMoeConfig(text_config=text, vision_config=_plain_config_dict(dense_config.vision_config),
                            image_token_id=dense_config.image_token_id, video_token_id=dense_config.video_token_id,
                            vision_start_token_id=dense_config.vision_start_token_id,
                            vision_end_token_id=dense_config.vision_end_token_id,
                            tie_word_embeddings=False)


def _load_dense_source(spec: CkptSpec, dtype: torch.dtype):
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    path = as_spec(spec).model_path
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise PrismError(f"cannot read the config of {spec.describe()}: {str(e).splitlines()[0]}") from None
    if config.model_type != "qwen3_vl":
        raise PrismError(f"the discriminator is upcycled from a dense Qwen3-VL; {spec.describe()} is "
                         f"'{config.model_type}'",
                         hint="give a Qwen3-VL (dense) checkpoint, e.g. tiny or an sft output")
    return Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")


def upcycle(dense_path_or_spec: str | CkptSpec, num_experts: int = 4, top_k: int = 2, noise_std: float = 0.01,
            router_std: float = 0.02, aux_loss_coef: float = 0.01, seed: int = 0, *, dense: bool = False,
            text_only: bool = False, value_head_std: float | None = None, dtype: str = "fp32",
            attn: str = "auto", device: torch.device | None = None) -> Discriminator:
    """Build the discriminator from a dense Qwen3-VL checkpoint (module docstring).

    dense=True: the dense ablation (dense backbone copied as is, value head only; the MoE arguments
    are unused). text_only=True: the text-only ablation flag. dtype is the built model's dtype
    (noise is drawn in fp32 from `seed`, then cast). Returns the model in eval mode on `device` (default: CPU,
    the caller places it).
    """
    spec = as_spec(dense_path_or_spec)
    torch_dtype = pick_dtype(dtype, torch.device("cpu"))
    source = _load_dense_source(spec, torch_dtype)
    if dense:
        config = source.config.__class__.from_dict(source.config.to_dict())
        cls = Qwen3VLDiscriminator
    else:
        config = moe_config_from_dense(source.config, num_experts, top_k, aux_loss_coef)
        cls = Qwen3VLMoeDiscriminator
    hidden = config.text_config.hidden_size
    setattr(config, CONFIG_KEY, {
        "variant": "dense" if dense else "moe", "text_only": bool(text_only),
        "value_head_std": float(value_head_std if value_head_std is not None else VALUE_HEAD_GAIN / math.sqrt(hidden)),
        "base": spec.ref,
        **({} if dense else {"noise_std": noise_std, "router_std": router_std, "seed": seed})})
    config.architectures = [cls.__name__]
    model = cls._from_config(config, dtype=torch_dtype,
                             attn_implementation=pick_attention(_disc_attn(attn), device or default_device()))

    generator = torch.Generator().manual_seed(seed)
    source_state = source.state_dict()
    used = set()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in source_state and source_state[name].shape == tensor.shape:
                tensor.copy_(source_state[name])
                used.add(name)
        if not dense:
            used |= _upcycle_experts(model, source_state, noise_std, router_std, generator)
        head = model.value_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * disc_settings(config)["value_head_std"])
        head.bias.zero_()
    # Every dense tensor but the LM head must land somewhere: a naming drift would otherwise leave
    # random layers in the discriminator silently.
    missed = [n for n in source_state if n not in used and not n.startswith("lm_head.")]
    if missed:
        raise PrismError(f"upcycling {spec.describe()} left {len(missed)} dense tensors unused (first: {missed[0]})",
                         hint="the installed transformers may name Qwen3-VL tensors differently")
    del source, source_state
    model.eval()
    return model.to(device) if device is not None else model


def _upcycle_experts(model, source_state: dict, noise_std: float, router_std: float,
                     generator: torch.Generator) -> set[str]:
    """Fill every layer's experts from the dense MLP (+ noise) and its router (normal); returns the dense names used."""
    used = set()
    text = model.config.text_config
    num_experts = text.num_experts
    for i, layer in enumerate(model.model.language_model.layers):
        prefix = f"model.language_model.layers.{i}.mlp."
        gate, up, down = (source_state[prefix + f"{p}.weight"].float() for p in ("gate_proj", "up_proj", "down_proj"))
        used |= {prefix + f"{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        gate_up = torch.cat([gate, up], dim=0)  # [2I, H]: gate rows first, as the experts' chunk(2) expects
        experts = layer.mlp.experts
        for e in range(num_experts):
            noise_gu = torch.randn(gate_up.shape, generator=generator) * noise_std
            noise_d = torch.randn(down.shape, generator=generator) * noise_std
            experts.gate_up_proj[e].copy_(gate_up + noise_gu)
            experts.down_proj[e].copy_(down + noise_d)
        router = layer.mlp.gate.weight
        router.copy_(torch.randn(router.shape, generator=generator) * router_std)
    return used


def _disc_attn(attn: str) -> str:
    return DEFAULT_ATTENTION if attn == "auto" else attn


# ------------------------------------------------------------------------------------------ save / load

def save_discriminator(model, processor, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """HF save_pretrained layout + the dense base's processor alongside (the discriminator tokenises with it).
    state_dict: the gathered weights when the model is sharded (FSDP2 / ZeRO-3)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    getattr(model, "module", model).save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return out_dir


def discriminator_dir(path: str | Path) -> Path:
    """The discriminator directory of a path: an align checkpoint's discriminator/ or the directory itself."""
    path = Path(path).expanduser()
    if (path / "discriminator" / "config.json").is_file():
        return path / "discriminator"
    if (path / "config.json").is_file():
        return path
    raise PrismError(f"{path} holds no discriminator (no config.json, no discriminator/)",
                     hint="give an align checkpoint or a directory written by save_discriminator")


def load_discriminator(path: str | Path, *, dtype: str = "auto", attn: str = "auto",
                       device: torch.device | None = None, train: bool = False,
                       allow_new_head: bool = False) -> Discriminator:
    """Load a saved discriminator, picking the MoE or dense class from its config.

    allow_new_head=True also accepts a plain Qwen3-VL(-MoE) causal-LM checkpoint (backbone matched, value
    head freshly initialised); by default such a directory is refused, since it is not a trained discriminator.
    """
    from transformers import AutoConfig

    directory = discriminator_dir(path)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise PrismError(f"cannot read the discriminator config in {directory}: {str(e).splitlines()[0]}") from None
    cls = _CLASS_BY_MODEL_TYPE.get(config.model_type)
    if cls is None:
        raise PrismError(f"{directory} is a '{config.model_type}' model; a discriminator is qwen3_vl or qwen3_vl_moe")
    if getattr(config, CONFIG_KEY, None) is None and not allow_new_head:
        raise PrismError(f"{directory} is a plain {config.model_type} model, not a discriminator (no {CONFIG_KEY} "
                         f"in config.json)", hint="build one with upcycle(), or pass allow_new_head=True")
    device = device or default_device()
    try:
        model = cls.from_pretrained(directory, config=config, dtype=pick_dtype(dtype, device),
                                    attn_implementation=pick_attention(_disc_attn(attn), device))
    except OSError as e:
        raise PrismError(f"cannot load discriminator weights from {directory}: {str(e).splitlines()[0]}") from None
    model.to(device)
    model.train(train)
    return model


def load_discriminator_processor(path: str | Path):
    """The processor saved alongside the discriminator."""
    return load_processor(str(discriminator_dir(path)))
