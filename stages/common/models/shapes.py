"""Published Qwen3-VL shapes with random weights: `qwen3vl-2b-shape`, `qwen3vl-4b-shape`, `qwen3vl-8b-shape`.

The configs are the published Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json values (text and vision towers,
vocabulary 151,936, tied embeddings for 2B and 4B). They serve two purposes, both without a model hub:
- `--dry-run --ckpt qwen3vl-4b-shape` plans memory from the real shape (the model is built on the meta device,
  so no weight is allocated);
- GPU benchmarks (`benchmarks/gpu_check.py`) build a random-weight model of the real width and depth.

A shape has no trained weights and no tokenizer of its own, so a stage refuses to *train* from one (only
`--dry-run` accepts it). Builders that need a processor pair it with the tiny tokenizer and move the
vision special-token ids to that tokenizer's ids (`with_token_ids`), which changes no parameter count.
"""

from __future__ import annotations

import copy

# Qwen3-VL special-token ids of the published configs (REFERENCE.md 7: ids 151643-151668).
QWEN3VL_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                         vision_end_token_id=151653)
_ROPE = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
_TEXT_COMMON = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
                    bos_token_id=151643, eos_token_id=151645, rope_parameters=_ROPE)
_VISION_COMMON = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh",
                      num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])

SHAPES = {
    "qwen3vl-2b-shape": dict(
        text=dict(_TEXT_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16),
        vision=dict(_VISION_COMMON, out_hidden_size=2048), tie_word_embeddings=True),
    "qwen3vl-4b-shape": dict(
        text=dict(_TEXT_COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                  num_attention_heads=32),
        vision=dict(_VISION_COMMON, out_hidden_size=2560), tie_word_embeddings=True),
    "qwen3vl-8b-shape": dict(
        text=dict(_TEXT_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32),
        vision=dict(_VISION_COMMON, depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                    deepstack_visual_indexes=[8, 16, 24]), tie_word_embeddings=False),
}
# The hub ids these shapes are published as (what a recipe names).
HUB_IDS = {"Qwen/Qwen3-VL-2B-Instruct": "qwen3vl-2b-shape", "Qwen/Qwen3-VL-4B-Instruct": "qwen3vl-4b-shape",
           "Qwen/Qwen3-VL-8B-Instruct": "qwen3vl-8b-shape"}


def is_shape(name: str) -> bool:
    return name in SHAPES


def shape_config(name: str, **overrides):
    """The published Qwen3VLConfig of a shape (text overrides such as num_hidden_layers go in `overrides`)."""
    from transformers import Qwen3VLConfig

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; one of {', '.join(SHAPES)}")
    spec = copy.deepcopy(SHAPES[name])
    text = dict(spec["text"], **{k: v for k, v in overrides.items() if k != "vision"})
    vision = dict(spec["vision"], **overrides.get("vision", {}))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"],
                         **QWEN3VL_TOKEN_IDS)


def with_token_ids(config, tokenizer):
    """The config with its vision special-token ids (and eos/pad) moved to `tokenizer`'s ids."""
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = None
    return config


def meta_model(config):
    """The model of `config` on the meta device: real parameter shapes, no memory."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)
