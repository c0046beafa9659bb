"""tiny-qwen: the embedded model with a real Qwen3-VL's interfaces (tokenizer, template, processor, embeddings)."""

import json

import pytest

from stages.common.contract.errors import PrismError
from stages.common.models.loading import check_tokenizer_matches_model, load_processor
from stages.common.world import qwen_vocab, tiny


@pytest.fixture(scope="module")
def processor(tiny_qwen_path):
    return load_processor("tiny-qwen")


def test_tokenizer_matches_llama_cpp_token_ids(processor):
    """llama.cpp ships its own tokenisation of test texts beside the vocabulary: ours must agree on all."""
    cases = qwen_vocab.llama_cpp_cases()
    assert len(cases) > 40
    tok = processor.tokenizer
    mismatched = [(text, ids) for text, ids in cases if tok(text, add_special_tokens=False)["input_ids"] != ids]
    assert mismatched == []


def test_added_tokens_and_protocol_tags(processor):
    tok = processor.tokenizer
    assert len(tok) == 151669
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in qwen_vocab.ADDED_TOKENS}
    assert ids["<|endoftext|>"] == 151643 and ids["<|im_end|>"] == 151645 and ids["<|image_pad|>"] == 151655
    assert ids["<think>"] == 151667 and ids["</think>"] == 151668
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    # <think> survives skip_special_tokens (not special); <|im_end|> does not
    assert tok.decode([151667, 9707, 151668, 151645], skip_special_tokens=True) == "<think>Hello</think>"
    # <caption> and <answer> are BPE pieces, with '>' merged into what follows
    pieces = tok.convert_ids_to_tokens(tok("<caption>\nx</caption><answer>B</answer>",
                                           add_special_tokens=False)["input_ids"])
    assert pieces[:3] == ["<", "caption", ">Ċ"] and ">B" in pieces


def test_model_has_the_real_interfaces(tiny_qwen_path, processor):
    config = json.loads((tiny_qwen_path / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 151936 and config["tie_word_embeddings"] is True
    assert config["vision_config"]["patch_size"] == 16 and config["vision_config"]["spatial_merge_size"] == 2
    assert config["vision_config"]["temporal_patch_size"] == 2 and config["image_token_id"] == 151655
    gen = json.loads((tiny_qwen_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    ip = processor.image_processor
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (16, 2, 2)
    assert processor.video_processor.patch_size == 16
    assert processor.chat_template == tiny.QWEN_CHAT_TEMPLATE_FILE.read_text()
    check_tokenizer_matches_model(processor.tokenizer, str(tiny_qwen_path))
    # the stock template: no default system prompt, no generation markers
    text = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tied_embeddings_after_reload(tiny_qwen_path):
    from stages.common.models.loading import load_policy

    model = load_policy("tiny-qwen", train=False)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight.shape[0] == 151936


def test_missing_vocabulary_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_QWEN_VOCAB_DIR", str(tmp_path))
    with pytest.raises(PrismError) as e:
        tiny.build_key("tiny-qwen")
    assert "ggml-vocab-qwen2.gguf is missing" in str(e.value) and "qwen_vocab install" in e.value.hint


def test_build_key_follows_the_vocabulary(tmp_path, monkeypatch):
    key = tiny.build_key("tiny-qwen")
    assert key == tiny.build_key("tiny-qwen") and key != tiny.build_key("tiny")
    copy = tmp_path / qwen_vocab.VOCAB_FILE
    copy.write_bytes(qwen_vocab.vocab_path().read_bytes()[:-1] + b"\0")
    monkeypatch.setenv("PRISM_QWEN_VOCAB_DIR", str(tmp_path))
    assert tiny.build_key("tiny-qwen") != key


@pytest.mark.parametrize("response", [
    "<caption>\n- a red circle\n</caption>\n<think>\n2 + 3 = 5.\n</think>\n<answer>5</answer>",
    "<caption>red</caption><think>so B.</think><answer>B</answer>",  # '>B' and '.</' merge across tags
])
def test_token_spans_with_tags_in_pieces(processor, response):
    """protocol.token_spans maps segment characters to tokens through offsets: with tags split into pieces
    (and pieces merged into content) each segment's tokens still cover its content and nothing beyond the
    tokens that touch it."""
    from stages.common.protocol import parse_response, token_spans

    tok = processor.tokenizer
    enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
    parsed = parse_response(response)
    assert parsed.format_ok
    spans = token_spans(parsed.spans, enc["offset_mapping"])
    for name in ("caption", "think", "answer"):
        start, end = spans[name]
        chars = parsed.spans[name]
        covered = (enc["offset_mapping"][start][0], enc["offset_mapping"][end - 1][1])
        assert covered[0] <= chars[0] and covered[1] >= chars[1]                 # covers the content
        assert enc["offset_mapping"][start][1] > chars[0] and enc["offset_mapping"][end - 1][0] < chars[1]  # minimal
        assert getattr(parsed, name) in tok.decode(enc["input_ids"][start:end])
