"""Assistant-only label masks for any chat template (stages.sft.targets), on the real Qwen3-VL tokenizer.

The stock Qwen3-VL template has no {% generation %} markers: transformers' assistant mask is all zeros there.
The masks here must be exact token by token: the assistant content plus its closing <|im_end|>, nothing else,
including responses whose protocol tags BPE merges into neighbouring text."""

import copy
import io

import pytest
from PIL import Image

from stages.common.contract.samples import Sample
from stages.common.data.chat import demonstration_text, sft_messages
from stages.common.models.loading import load_processor
from stages.common.world import synth, tiny
from stages.sft import targets
from stages.sft.data import encode_sample

# Qwen2.5-VL's shape: a default system prompt when none is given, the same vision placeholders.
QWEN25_STYLE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template that rewrites assistant content: no turn can be located, so samples must be refused.
REWRITING = tiny.CHAT_TEMPLATE.replace("{{- message['content'] -}}{%- else -%}{%- for part",
                                       "{{- message['content'] | upper -}}{%- else -%}{%- for part", 1)


@pytest.fixture(scope="module")
def processor(tiny_qwen_path):
    return load_processor("tiny-qwen")


def with_template(processor, template):
    p = copy.copy(processor)
    p.chat_template = template
    return p


def _png(color, size=64):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def demo_sample(index=1):
    s = synth.load("synth:train:3")[index]
    return Sample(**{**s.__dict__, "teacher": synth.oracle_demo(s)})


def labelled_runs(enc):
    """Contiguous runs of labelled positions as (start, end)."""
    runs, start = [], None
    flags = enc.label_mask.tolist() + [False]
    for i, f in enumerate(flags):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def assert_exact(enc, tok, contents):
    """Each assistant turn is one labelled run: exactly its content + <|im_end|>, and the tokens around it
    are unlabelled (the token before ends the generation prompt, the one after is the template's newline)."""
    runs = labelled_runs(enc)
    assert len(runs) == len(contents)
    ids = enc.input_ids.tolist()
    for (start, end), content in zip(runs, contents):
        assert tok.decode(ids[start:end]) == content + "<|im_end|>"
        assert ids[end - 1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert end == len(ids) or tok.decode(ids[end:end + 1]) == "\n"


def test_stock_template_has_no_markers_and_transformers_mask_is_empty(processor):
    """The bug this replaces: with the stock template return_assistant_tokens_mask gives all zeros."""
    assert "{% generation %}" not in processor.chat_template and "{%- generation" not in processor.chat_template
    messages = sft_messages(demo_sample(), images=[Image.new("RGB", (64, 64))])
    enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(enc["assistant_masks"][0]) == 0
    # the stock template emits no default system prompt: prism adds the protocol prompt itself
    no_system = processor.apply_chat_template(messages[1:], tokenize=False)
    assert not no_system.startswith("<|im_start|>system")


def test_stock_template_mask_is_exact_token_by_token(processor):
    tok = processor.tokenizer
    sample = demo_sample()
    enc = encode_sample(sample, processor, None, max_length=4096)
    assert_exact(enc, tok, [demonstration_text(sample)])
    # the protocol tags are several BPE pieces here (not single tokens as in tiny)
    labelled = [tok.convert_ids_to_tokens(i) for i in enc.input_ids[enc.label_mask].tolist()]
    assert labelled[:3] == ["<", "caption", ">Ċ"]
    assert int((enc.mm_token_type_ids == 1).sum()) == 4  # 64x64 image, 16-px patches merged 2x2


def test_response_without_newlines_tags_merged_into_neighbours(processor):
    tok = processor.tokenizer
    response = "<caption>a red circle.</caption><think>so B.</think><answer>B</answer>"
    sample = Sample(id="x", images=[_png("red")], question="Which?",
                    conversation=[{"role": "user", "content": "<image>Which?"},
                                  {"role": "assistant", "content": response}])
    enc = encode_sample(sample, processor, None, max_length=4096)
    assert_exact(enc, tok, [response])
    pieces = [tok.convert_ids_to_tokens(i) for i in enc.input_ids[enc.label_mask].tolist()]
    assert ">B" in pieces and ".</" in pieces  # merged tag pieces are labelled like any other text


def test_multi_turn_with_several_images(processor):
    tok = processor.tokenizer
    sample = Sample(id="c", images=[_png("red"), _png("blue", 96), _png("green")], question="",
                    conversation=[{"role": "user", "content": "<image><image>What colours?"},
                                  {"role": "assistant", "content": "red and blue"},
                                  {"role": "user", "content": "And this one? <image>"},
                                  {"role": "assistant", "content": "<answer>green</answer>"}])
    enc = encode_sample(sample, processor, None, max_length=4096)
    assert enc.image_grid_thw.shape[0] == 3
    assert_exact(enc, tok, ["red and blue", "<answer>green</answer>"])
    assert not (enc.label_mask & (enc.mm_token_type_ids == 1)).any()


def test_qwen25_style_template_with_default_system_prompt(processor):
    p = with_template(processor, QWEN25_STYLE)
    sample = demo_sample(2)
    enc = encode_sample(sample, p, None, max_length=4096, system_prompt=False)
    assert p.tokenizer.decode(enc.input_ids[:12]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert_exact(enc, p.tokenizer, [demonstration_text(sample)])


def test_marked_template_agrees_with_transformers_mask(processor):
    p = with_template(processor, tiny.CHAT_TEMPLATE)
    sample = demo_sample(0)
    enc = encode_sample(sample, p, None, max_length=4096)
    messages = sft_messages(sample, images=sample.pil_images())
    ref = p.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ref["input_ids"][0] == enc.input_ids.tolist()
    assert [bool(x) for x in ref["assistant_masks"][0]] == enc.label_mask.tolist()


def test_unlocatable_target_is_refused_with_its_reason(processor):
    p = with_template(processor, REWRITING)
    reason = encode_sample(demo_sample(), p, None, max_length=4096)
    assert reason == "assistant turn 1 does not appear verbatim in the chat template's output"


def test_token_mask_and_expansion_on_hand_made_inputs():
    # spans are character ranges; a token is labelled when it overlaps one
    assert targets.token_mask([(0, 2), (2, 5), (5, 9), (9, 10)], [(3, 9)]) == [False, True, True, False]
    assert targets.token_mask([(0, 0), (0, 4)], [(0, 4)]) == [False, True]  # zero-width tokens never
    # placeholder 7 expands to runs of 2 and 3; others match one to one
    assert targets.expand_placeholders([1, 7, 2, 7, 3], [0, 0, 0, 0, 1], [1, 7, 7, 2, 7, 7, 7, 3], 7, [2, 3]) == \
        [False] * 7 + [True]
    assert targets.expand_placeholders([1, 7, 3], [0, 0, 1], [1, 7, 3], 7, [2]) is None


def test_a_run_with_no_locatable_target_fails_loudly(processor):
    """Every sample refused: encoding stops the run with the reason, and the reasons are counted."""
    from stages.common.contract.config import resolve
    from stages.common.contract.errors import PrismError
    from stages.sft.config import SFTConfig
    from stages.sft.run import encode_all

    cfg = resolve(SFTConfig, flags={})
    refused = {}
    with pytest.raises(PrismError, match="no sample has a training target .*does not appear verbatim"):
        encode_all([demo_sample(0), demo_sample(1)], with_template(processor, REWRITING), None, cfg, "encoding train",
                   refused)
    assert refused == {"assistant turn 1 does not appear verbatim in the chat template's output": 2}
