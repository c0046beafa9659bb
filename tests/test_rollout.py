"""Rollout engines on the tiny Qwen3-VL: the hf engine end to end, the vllm engine's pure pieces."""

import copy
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from stages.common.contract.errors import PrismError, UsageError
from stages.common.rollout import RolloutPrompt, SamplingParams, make_engine
from stages.common.rollout import vllm as vllm_engine
from stages.common.rollout.hf import HFEngine, cut_after_stop, truncate_top_k_top_p
from stages.common.rollout.prompts import vision_token_ids


@pytest.fixture(scope="module")
def policy(tiny_path):
    from stages.common.models.loading import load_policy, load_processor

    return load_policy(tiny_path, train=False), load_processor(tiny_path)


def shape_image(color, size=64):
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((8, 8, size // 2, size // 2), fill=color)
    return img


def two_prompts():
    """Different images (64x64 -> 16 image tokens, 96x96 -> 36) and different text lengths."""
    return [
        RolloutPrompt(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}],
                      images=[shape_image((200, 30, 30))]),
        RolloutPrompt(messages=[{"role": "user", "content": [
            {"type": "text", "text": "Look at the picture and count every red circle and blue square."},
            {"type": "image"}]}], images=[shape_image((30, 30, 200), 96)]),
    ]


def with_logit_bias(model, bias_by_id: dict):
    """A copy of `model` whose lm_head adds a bias (to make chosen tokens dominate)."""
    biased = copy.deepcopy(model)
    head = biased.lm_head
    new_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    new_head.weight.data.copy_(head.weight.data)
    new_head.bias.data.zero_()
    for i, b in bias_by_id.items():
        new_head.bias.data[i] = b
    biased.lm_head = new_head
    return biased


def test_make_engine_picks_hf_without_vllm(policy):
    model, processor = policy
    assert make_engine("auto", model, processor).name == "hf"
    assert make_engine("hf", model, processor).name == "hf"
    with pytest.raises(PrismError, match="vLLM") as err:
        make_engine("vllm", model, processor)
    assert "pip install 'prism-vlm[gpu]'" in err.value.hint
    with pytest.raises(UsageError):
        make_engine("sglang", model, processor)


def test_same_seed_same_samples_other_seed_differs(policy):
    engine = HFEngine(*policy)
    params = SamplingParams(n=2, max_new_tokens=8, seed=3)
    first = engine.generate(two_prompts(), params)
    again = engine.generate(two_prompts(), params)
    other = engine.generate(two_prompts(), SamplingParams(n=2, max_new_tokens=8, seed=4))
    ids = lambda res: [c.token_ids for group in res for c in group]  # noqa: E731
    assert ids(first) == ids(again)
    assert [c.logprobs for g in first for c in g] == [c.logprobs for g in again for c in g]
    assert ids(first) != ids(other)


def test_n_samples_per_prompt_with_different_images(policy):
    model, processor = policy
    was_training = model.training
    res = HFEngine(model, processor).generate(two_prompts(), SamplingParams(n=3, max_new_tokens=6, seed=0))
    assert [len(group) for group in res] == [3, 3]
    for group in res:
        assert len({tuple(c.token_ids) for c in group}) > 1      # the n samples are drawn independently
        for c in group:
            assert 0 < len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
    assert model.training == was_training


def test_training_mode_restored(policy):
    model, processor = policy
    model.train(True)
    try:
        HFEngine(model, processor).generate(two_prompts()[:1], SamplingParams(max_new_tokens=2, seed=0))
        assert model.training
    finally:
        model.train(False)


def test_vision_tokens_never_sampled(policy):
    model, processor = policy
    banned = vision_token_ids(processor)
    assert len(banned) == 5
    biased = with_logit_bias(model, {i: 40.0 for i in banned})
    res = HFEngine(biased, processor).generate(two_prompts(), SamplingParams(n=4, max_new_tokens=6, seed=0))
    sampled = {t for group in res for c in group for t in c.token_ids}
    assert not sampled & set(banned)
    # and the bias did make them dominate the raw distribution
    enc = processor(text=["hello"], return_tensors="pt")
    with torch.no_grad():
        assert int(biased(**enc).logits[0, -1].argmax()) in banned


def test_eos_finishes_with_stop(policy):
    model, processor = policy
    eos = processor.tokenizer.eos_token_id
    biased = with_logit_bias(model, {eos: 40.0})
    res = HFEngine(biased, processor).generate(two_prompts(), SamplingParams(n=2, max_new_tokens=5, seed=0))
    for c in (c for g in res for c in g):
        assert c.token_ids == [eos] and c.finish_reason == "stop" and c.text == ""


def test_max_new_tokens_gives_length(policy):
    res = HFEngine(*policy).generate(two_prompts(), SamplingParams(n=2, max_new_tokens=7, seed=1))
    eos = policy[1].tokenizer.eos_token_id
    for c in (c for g in res for c in g):
        if c.token_ids[-1] != eos:
            assert len(c.token_ids) == 7 and c.finish_reason == "length"


def test_stop_string_cuts_text_and_stops(policy):
    model, processor = policy
    engine = HFEngine(model, processor)
    prompt = two_prompts()[:1]
    full = engine.generate(prompt, SamplingParams(max_new_tokens=16, seed=5))[0][0]
    tok = processor.tokenizer
    # a stop string that appears mid-completion: the decoded text of one ASCII-letter token
    pieces = [tok.decode([t]) for t in full.token_ids]
    k = next(i for i in range(2, len(pieces)) if pieces[i].strip().isalpha() and pieces[i].isascii())
    stop = pieces[k].strip()
    cut = engine.generate(prompt, SamplingParams(max_new_tokens=16, seed=5, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop) + len(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) <= k + 1


def test_top_k_1_and_tiny_top_p_are_greedy(policy):
    engine = HFEngine(*policy)
    greedy = engine.generate(two_prompts(), SamplingParams(max_new_tokens=5, temperature=0.0, seed=0))
    top1 = engine.generate(two_prompts(), SamplingParams(max_new_tokens=5, top_k=1, seed=9))
    nucleus = engine.generate(two_prompts(), SamplingParams(max_new_tokens=5, top_p=1e-6, seed=7))
    ids = lambda res: [c.token_ids for g in res for c in g]  # noqa: E731
    assert ids(greedy) == ids(top1) == ids(nucleus)


def test_truncate_top_k_top_p_on_hand_made_logprobs():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(truncate_top_k_top_p(logp, 2, 1.0)[0, 2:]).all()
    kept = truncate_top_k_top_p(logp, 0, 0.7)     # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(kept[0, :2]).all() and torch.isinf(kept[0, 2:]).all()
    assert cut_after_stop("abc</answer>zzz", ["</answer>"]) == "abc</answer>"
    assert cut_after_stop("a;b.c", [".", ";"]) == "a;"


# ---- vllm engine pieces, without vLLM ------------------------------------------------------------------

def test_vllm_request_building(policy):
    _, processor = policy
    prompt = two_prompts()[1]
    req = vllm_engine.build_request(processor, prompt)
    assert req["prompt"].count("<|image_pad|>") == 1               # vLLM expands the placeholder itself
    assert req["prompt"].endswith("<|im_start|>assistant\n")
    assert "Look at the picture" in req["prompt"]
    assert len(req["multi_modal_data"]["image"]) == 1 and req["multi_modal_data"]["image"][0].size == (96, 96)
    text_only = RolloutPrompt(messages=[{"role": "user", "content": "hi"}])
    assert "multi_modal_data" not in vllm_engine.build_request(processor, text_only)
    bad = RolloutPrompt(messages=[{"role": "user", "content": [{"type": "image"}]}], images=[])
    with pytest.raises(PrismError, match="image"):
        vllm_engine.build_request(processor, bad)


def test_vllm_sampling_kwargs():
    kw = vllm_engine.sampling_kwargs(SamplingParams(n=4, temperature=0.7, max_new_tokens=9, stop=["</answer>"],
                                                    seed=11), banned_ids=[5, 6], seed=13)
    assert kw["n"] == 4 and kw["max_tokens"] == 9 and kw["temperature"] == 0.7
    assert kw["top_k"] == -1 and kw["top_p"] == 1.0
    assert kw["stop"] == ["</answer>"] and kw["include_stop_str_in_output"]
    assert kw["logprobs"] == 0 and kw["seed"] == 13
    assert kw["logit_bias"] == {5: -100.0, 6: -100.0}
    assert "seed" not in vllm_engine.sampling_kwargs(SamplingParams(), [])


def test_vllm_weight_names():
    assert vllm_engine.hf_weight_name("module.model.language_model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert vllm_engine.hf_weight_name("_orig_mod.model.layers.1._fsdp_wrapped_module.self_attn.q_proj.weight") == \
        "model.layers.1.self_attn.q_proj.weight"
    assert vllm_engine.hf_weight_name(
        "model.visual.blocks.0._checkpoint_wrapped_module.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    # a tied lm_head is sent too (vLLM keeps its own tensor, which a reload without it leaves stale); each name once
    named = [("module.lm_head.weight", torch.zeros(1)), ("module.model.norm.weight", torch.ones(1)),
             ("model.norm.weight", torch.ones(1))]
    assert [n for n, _ in vllm_engine.weights_to_load(named)] == ["lm_head.weight", "model.norm.weight"]


def test_vllm_weight_names_cover_the_tiny_checkpoint(policy, tiny_path):
    """The names we send are exactly the saved checkpoint's names (what vLLM's loader maps from)."""
    import json

    model, _ = policy
    sent = {n for n, _ in vllm_engine.weights_to_load(vllm_engine.full_parameters(model))}
    index = tiny_path / "model.safetensors.index.json"
    if index.exists():
        saved = set(json.loads(index.read_text())["weight_map"])
    else:
        from safetensors import safe_open

        with safe_open(str(tiny_path / "model.safetensors"), "pt") as f:
            saved = set(f.keys())
    assert saved <= sent


def test_vllm_output_to_completion():
    logprob = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    out = SimpleNamespace(token_ids=(7, 9), text="ab", finish_reason="stop",
                          logprobs=[{7: logprob(-0.5), 3: logprob(-1.0)}, {9: logprob(-0.25)}])
    c = vllm_engine.completion_from_output(out)
    assert c.token_ids == [7, 9] and c.logprobs == [-0.5, -0.25] and c.finish_reason == "stop" and c.text == "ab"
    out.finish_reason = "length"
    assert vllm_engine.completion_from_output(out).finish_reason == "length"
