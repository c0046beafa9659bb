"""The embedded tiny models (`--ckpt tiny`, `--ckpt tiny-moe`): deterministic builds, real HF classes and
processor, image tokens, protocol tokens, generation, and trainability (a short overfit)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from stages.common.world import tiny
from tests.conftest import LEARNING_SEED

BUILT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "processor_config.json", "chat_template.jinja")


def digests(path: Path) -> dict:
    """sha256 of every built file (not the cache's .complete stamp)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name != ".complete"}


def red_square(size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 0, 0))
    for x in range(size // 4, size // 2):
        for y in range(size // 4, size // 2):
            img.putpixel((x, y), (0, 0, 255))
    return img


@pytest.fixture(scope="module")
def processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def model(tiny_path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_path).eval()


def prompt_inputs(processor, question: str = "What color is the square?", image=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[image or red_square()], return_tensors="pt")


# --------------------------------------------------------------------------------------- determinism

def test_build_is_deterministic_across_cache_dirs(tmp_path, monkeypatch, tiny_path):
    built = []
    for home in ("home-a", "home-b"):
        monkeypatch.setenv("PRISM_HOME", str(tmp_path / home))
        path = tiny.ensure("tiny")
        assert path.parent == tmp_path / home / "tiny" and (path / ".complete").is_file()
        built.append(path)
    a, b = digests(built[0]), digests(built[1])
    for name in BUILT_FILES:
        assert name in a, name
    assert a == b
    # and the same bytes as the session's cached build (made by another process, maybe another day)
    assert digests(tiny_path) == a


def test_ensure_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_HOME", str(tmp_path))
    path = tiny.ensure("tiny")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure("tiny") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [path.name]  # no temp dirs left behind


def test_prism_home_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PRISM_HOME", "~/prism-cache")
    assert tiny.cache_root() == tmp_path / "prism-cache" / "tiny"
    monkeypatch.setenv("PRISM_HOME", "")
    assert tiny.cache_root() == tmp_path / ".cache" / "prism" / "tiny"


def test_moe_build_is_deterministic(tmp_path, tiny_moe_path):
    out = tiny.build("tiny-moe", tmp_path / "moe")
    assert set(BUILT_FILES) <= set(digests(out))
    assert digests(out) == digests(tiny_moe_path)


def test_build_key_and_unknown_name():
    assert tiny.build_key("tiny") != tiny.build_key("tiny-moe")
    assert tiny.build_key("tiny") == tiny.build_key("tiny") != tiny.build_key("tiny", seed=1)
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny.build("huge", "/nonexistent")


# ------------------------------------------------------------------------------- reload through HF Auto*

def test_reloads_as_real_qwen3vl(tiny_path, processor, model):
    from transformers import (
        AutoModelForImageTextToText,
        Qwen2VLImageProcessor,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    assert isinstance(processor, Qwen3VLProcessor)  # not a bare tokenizer (that happens without torchvision)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessor)
    assert processor.chat_template and "generation" in processor.chat_template
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n <= 3_000_000, n
    # a second load is identical, weight for weight
    again = AutoModelForImageTextToText.from_pretrained(tiny_path)
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_loads_through_prism_models(tiny_path):
    from stages.common.models.loading import load_policy, load_processor

    proc = load_processor("tiny")
    assert type(proc).__name__ == "Qwen3VLProcessor" and proc.tokenizer.pad_token_id is not None
    policy = load_policy("tiny", device=torch.device("cpu"), train=False)
    assert policy.dtype == torch.float32 and not policy.training


def test_moe_reloads(tiny_moe_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLMoeForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(tiny_moe_path).eval()
    assert isinstance(model, Qwen3VLMoeForConditionalGeneration)
    assert model.config.text_config.num_experts == tiny.MOE_EXPERTS
    proc = AutoProcessor.from_pretrained(tiny_moe_path)
    with torch.no_grad():
        out = model(**prompt_inputs(proc))
    assert out.logits.shape[-1] == model.config.text_config.vocab_size
    assert torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------------------ tokens and images

def test_64px_image_is_16_image_tokens(processor, model):
    enc = prompt_inputs(processor, image=red_square(64))
    assert (enc["input_ids"] == model.config.image_token_id).sum().item() == 16
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    # larger images are bounded by MAX_PIXELS: 256x256 -> 128x128 -> 16x16 patches -> 64 tokens
    enc = prompt_inputs(processor, image=red_square(256))
    assert (enc["input_ids"] == model.config.image_token_id).sum().item() == 64


def test_protocol_and_special_tags_are_single_tokens(processor):
    tok = processor.tokenizer
    for tag in tiny.PROTOCOL_TOKENS + tiny.SPECIAL_TOKENS:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, (tag, ids)
        assert tok.decode(ids) == tag
    # inside text too, not only alone
    ids = tok.encode("x<answer>42</answer>y", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<answer>") in ids and tok.convert_tokens_to_ids("</answer>") in ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_digits_are_covered(processor):
    tok = processor.tokenizer
    for d in "0123456789":
        assert len(tok.encode(d, add_special_tokens=False)) == 1, d
    for text in ("<answer>1234567890</answer>", "3.5 + 1/2 = 4", "(B) 42", "x = -17"):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in tok.encode("0123456789", add_special_tokens=False)


def test_chat_template_marks_assistant_tokens(processor):
    answer = "<answer>7</answer>"
    messages = [{"role": "user", "content": [{"type": "text", "text": "How many?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    out = processor.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = [i for i, m in zip(ids, mask) if m]
    assert processor.tokenizer.decode(marked) == answer + "<|im_end|>"


# ------------------------------------------------------------------------------------ generate and train

def test_generate_from_an_image(processor, model):
    enc = prompt_inputs(processor)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 1 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 6
    # greedy is deterministic
    with torch.no_grad():
        again = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, again)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id


@pytest.mark.learning
def test_tiny_model_learns_a_fixed_answer(tiny_path, processor, record_learning):
    """Trainable, not only constructible: a few dozen AdamW steps on one example and greedy decoding
    reproduces the answer."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(LEARNING_SEED)   # the weights are the cached tiny's; the seed reaches dropout and sampling
    model = AutoModelForImageTextToText.from_pretrained(tiny_path)
    image, answer = red_square(), "<answer>42</answer>"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many sides?"}]}
    full = processor.apply_chat_template([user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                                         tokenize=False)
    prompt = prompt_inputs(processor, "How many sides?", image)
    enc = processor(text=[full], images=[image], return_tensors="pt")
    n_prompt = prompt["input_ids"].shape[1]
    assert torch.equal(enc["input_ids"][:, :n_prompt], prompt["input_ids"])
    labels = enc["input_ids"].clone()
    labels[:, :n_prompt] = -100  # loss on the answer (and <|im_end|>) only

    def greedy() -> str:
        model.eval()
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        return processor.tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)

    assert greedy() != answer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    learned = greedy()
    record_learning("loss last / first", losses[-1] / losses[0], 0.2, above=False)
    record_learning("greedy reproduces the answer", float(learned == answer), 1.0)
    # The same on every seed and kernel path measured (issue 37): loss last/first 0.0375 against 0.2, and the
    # answer reproduced; the seed only reaches sampling-free code here, so the trajectory is the weights'.
    assert losses[-1] < 0.2 * losses[0], losses
    assert learned == answer
