"""The discriminator: sparse upcycling, value head, save/load round trip, dense and text-only ablations."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stages.align.scoring import encode_prompt
from stages.common.contract.errors import PrismError
from stages.common.models.discriminator import (
    CONFIG_KEY,
    Qwen3VLDiscriminator,
    Qwen3VLMoeDiscriminator,
    aux_loss_coef,
    is_text_only,
    load_discriminator,
    load_discriminator_processor,
    save_discriminator,
    upcycle,
)
from stages.common.models.loading import load_processor
from stages.common.rollout.base import RolloutPrompt


@pytest.fixture(scope="module")
def processor():
    return load_processor("tiny")


@pytest.fixture(scope="module")
def prompt_inputs(processor):
    image = Image.fromarray((np.random.RandomState(0).rand(64, 48, 3) * 255).astype("uint8"))
    prompt = RolloutPrompt(messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "How many red circles are there?"}]}], images=[image])
    enc = encode_prompt(processor, prompt)
    answer = processor.tokenizer("<caption>- two red circles</caption>", add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc.input_ids, torch.tensor(answer)])[None]
    mm = torch.cat([enc.mm_token_type_ids, torch.zeros(len(answer), dtype=torch.long)])[None]
    return dict(input_ids=ids, mm_token_type_ids=mm, pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)


@pytest.fixture(scope="module")
def moe_disc():
    return upcycle("tiny", seed=3)


def test_upcycle_without_noise_computes_the_dense_model(tiny_path, prompt_inputs):
    from transformers import Qwen3VLForConditionalGeneration

    dense = Qwen3VLForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    disc = upcycle("tiny", noise_std=0.0, seed=1)
    assert isinstance(disc, Qwen3VLMoeDiscriminator)
    text = disc.config.text_config
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (4, 2, 384)
    assert text.decoder_sparse_step == 1 and text.mlp_only_layers == []
    with torch.no_grad():
        want = dense.model(**prompt_inputs).last_hidden_state
        got = disc.model(**prompt_inputs).last_hidden_state
    assert (want - got).abs().max() < 1e-5
    # routing really happened: the router is random, not degenerate
    assert disc.model.language_model.layers[0].mlp.gate.weight.std() > 0.01


def test_upcycle_copies_dense_tensors_and_noises_experts(tiny_path, moe_disc):
    from safetensors.torch import load_file

    dense = load_file(str(tiny_path / "model.safetensors"))
    state = moe_disc.state_dict()
    for name in ("model.visual.blocks.0.attn.qkv.weight", "model.language_model.embed_tokens.weight",
                 "model.language_model.layers.1.self_attn.q_proj.weight", "model.language_model.norm.weight"):
        assert torch.equal(state[name], dense[name]), name
    prefix = "model.language_model.layers.2.mlp."
    gate_up = torch.cat([dense[prefix + "gate_proj.weight"], dense[prefix + "up_proj.weight"]])
    experts_gu = state[prefix + "experts.gate_up_proj"]
    experts_down = state[prefix + "experts.down_proj"]
    assert experts_gu.shape == (4, *gate_up.shape)
    for e in range(4):
        assert abs(float((experts_gu[e] - gate_up).std()) - 0.01) < 1e-3
        assert abs(float((experts_down[e] - dense[prefix + "down_proj.weight"]).std()) - 0.01) < 1e-3
    assert not torch.equal(experts_gu[0], experts_gu[1])  # independent noise per expert
    assert abs(float(state[prefix + "gate.weight"].std()) - 0.02) < 5e-3
    # deterministic from the seed
    again = upcycle("tiny", seed=3).state_dict()
    assert all(torch.equal(again[k], v) for k, v in state.items())


def test_forward_values_and_router_aux_loss(moe_disc, prompt_inputs):
    out = moe_disc(**prompt_inputs, output_router_logits=True)
    assert out.token_values.shape == prompt_inputs["input_ids"].shape and out.token_values.dtype == torch.float32
    assert out.aux_loss is not None and out.aux_loss.requires_grad and out.aux_loss.item() > 0
    assert len(out.router_logits) == moe_disc.config.text_config.num_hidden_layers
    assert aux_loss_coef(moe_disc) == pytest.approx(0.01)
    assert moe_disc(**prompt_inputs).aux_loss is None


def test_save_and_reload_are_exact(tmp_path, processor):
    disc = upcycle("tiny", seed=5, text_only=True)
    save_discriminator(disc, processor, tmp_path / "discriminator")
    config = json.loads((tmp_path / "discriminator" / "config.json").read_text())
    assert config[CONFIG_KEY]["text_only"] is True and config["architectures"] == ["Qwen3VLMoeDiscriminator"]
    loaded = load_discriminator(tmp_path / "discriminator", device=torch.device("cpu"))
    assert type(loaded) is Qwen3VLMoeDiscriminator and is_text_only(loaded)
    want, got = disc.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert "value_head.weight" in got and torch.count_nonzero(got["value_head.weight"]) > 0
    assert loaded.config.text_config.router_aux_loss_coef == pytest.approx(0.01)
    reloaded_processor = load_discriminator_processor(tmp_path / "discriminator")
    assert reloaded_processor.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    # an align checkpoint holds it under discriminator/
    assert type(load_discriminator(tmp_path, device=torch.device("cpu"))) is Qwen3VLMoeDiscriminator


def test_causal_lm_checkpoint_loads_backbone_with_a_new_value_head(tiny_moe_path):
    from safetensors.torch import load_file

    with pytest.raises(PrismError, match="not a discriminator"):
        load_discriminator(tiny_moe_path, device=torch.device("cpu"))
    disc = load_discriminator(tiny_moe_path, device=torch.device("cpu"), allow_new_head=True)
    source = load_file(str(tiny_moe_path / "model.safetensors"))
    state = disc.state_dict()
    backbone = [k for k in source if not k.startswith("lm_head.")]
    assert backbone and all(torch.equal(state[k], source[k]) for k in backbone)
    head = state["value_head.weight"]
    assert 0 < float(head.std()) < 0.05 and torch.count_nonzero(state["value_head.bias"]) == 0


def test_dense_ablation_round_trips(tmp_path, processor, prompt_inputs):
    disc = upcycle("tiny", dense=True)
    assert type(disc) is Qwen3VLDiscriminator and aux_loss_coef(disc) == 0.0
    out = disc(**prompt_inputs, output_router_logits=True)
    assert out.token_values.shape == prompt_inputs["input_ids"].shape and out.aux_loss is None
    save_discriminator(disc, processor, tmp_path)
    loaded = load_discriminator(tmp_path, device=torch.device("cpu"))
    assert type(loaded) is Qwen3VLDiscriminator
    want, got = disc.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_text_only_refuses_pixels(prompt_inputs):
    disc = upcycle("tiny", text_only=True)
    with pytest.raises(ValueError, match="text-only"):
        disc(**prompt_inputs)


def test_upcycle_refuses_a_non_dense_source():
    with pytest.raises(PrismError, match="dense Qwen3-VL"):
        upcycle("tiny-moe")
