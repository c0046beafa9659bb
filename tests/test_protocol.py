"""The response protocol: validity exactly as the reference regex, best-effort segments, spans."""

import random
import re
import time

import pytest

from stages.common.protocol import SEGMENTS, SYSTEM_PROMPT, format_response, parse_response, token_spans

# The authors' rule, spelled out here on purpose: parse_response must agree with it.
REFERENCE = re.compile(r"\s*<caption>(.*?)</caption>\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
TAGS = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"]


def assert_spans_consistent(text, parsed):
    for name in SEGMENTS:
        content, span = getattr(parsed, name), parsed.spans[name]
        assert (content is None) == (span is None), name
        if span is not None:
            assert text[span[0]:span[1]] == content, name


def test_system_prompt_is_short_and_names_the_tags():
    assert len(SYSTEM_PROMPT.split()) <= 60
    for tag in TAGS:
        assert tag in SYSTEM_PROMPT
    assert SYSTEM_PROMPT.index("<caption>") < SYSTEM_PROMPT.index("<think>") < SYSTEM_PROMPT.index("<answer>")


def test_format_response_round_trips():
    text = format_response("  - a red circle\n- text 'A'  ", "\n3 + 4 = 7\n", " 7 ")
    assert text == "<caption>\n- a red circle\n- text 'A'\n</caption>\n<think>\n3 + 4 = 7\n</think>\n<answer>7</answer>"
    parsed = parse_response(text)
    assert parsed.format_ok
    assert (parsed.caption, parsed.think, parsed.answer) == ("- a red circle\n- text 'A'", "3 + 4 = 7", "7")
    assert_spans_consistent(text, parsed)


@pytest.mark.parametrize("text", [
    "<caption>c</caption><think>t</think><answer>a</answer>",
    "  \n<caption> c </caption>\n\n<think>\tt\t</think> <answer> a </answer>\n\n",
    "<caption>\nc\n</caption>\r\n<think>\nt\n</think>\r\n<answer>a</answer>",
    "\u3000<caption>c</caption>\u00a0<think>t</think><answer>a</answer>",  # unicode whitespace, as regex \s
])
def test_valid_whitespace_variants(text):
    parsed = parse_response(text)
    assert parsed.format_ok
    assert (parsed.caption, parsed.think, parsed.answer) == ("c", "t", "a")
    assert_spans_consistent(text, parsed)


def test_empty_segments_are_valid_and_empty():
    text = "<caption></caption><think> </think><answer>\n</answer>"
    parsed = parse_response(text)
    assert parsed.format_ok and (parsed.caption, parsed.think, parsed.answer) == ("", "", "")
    assert_spans_consistent(text, parsed)


@pytest.mark.parametrize("text, expected", [
    # wrong order
    ("<think>t</think><caption>c</caption><answer>a</answer>", ("c", None, "a")),
    ("<answer>a</answer><think>t</think><caption>c</caption>", ("c", None, "a")),
    # missing tags
    ("<think>t</think><answer>a</answer>", (None, "t", "a")),
    ("<caption>c</caption><answer>a</answer>", ("c", None, "a")),
    ("<caption>c</caption><think>t</think>", ("c", "t", None)),
    ("<caption>c</caption><think>t</think>a", ("c", "t", None)),
    ("just an answer", (None, None, None)),
    ("", (None, None, None)),
    # extra text before / after / between
    ("Sure! <caption>c</caption><think>t</think><answer>a</answer>", ("c", "t", "a")),
    ("<caption>c</caption><think>t</think><answer>a</answer> Hope it helps", ("c", "t", "a")),
    ("<caption>c</caption> so <think>t</think><answer>a</answer>", ("c", "t", "a")),
    # truncated / unclosed
    ("<caption>c</caption><think>t</think><answer>4", ("c", "t", None)),
    ("<caption>c</caption><think>long reasoning that never ends", ("c", None, None)),
    ("<caption>c", (None, None, None)),
    ("<caption>c</caption><think>t</think><answer>a</answ", ("c", "t", None)),
    # repeated blocks plus trailing text: best effort takes the last answer block
    ("<caption>c</caption><think>t</think><answer>1</answer> <answer>2</answer> ok", ("c", "t", "2")),
    ("<caption>c</caption><think>t</think><caption>d</caption><answer>a</answer>", ("c", "t", "a")),
])
def test_invalid_responses_give_best_effort_segments(text, expected):
    parsed = parse_response(text)
    assert not parsed.format_ok
    assert (parsed.caption, parsed.think, parsed.answer) == expected
    assert_spans_consistent(text, parsed)


@pytest.mark.parametrize("text", [
    # The reference regex accepts these (non-greedy with backtracking): so do we, with its segments.
    "<caption>a</caption>b</caption><think>t</think><answer>x</answer>",
    "<caption>c</caption><think>t</think><answer>1</answer><answer>2</answer>",
    "<caption>c</caption><think>t</think><answer>1</answer><think>u</think><answer>2</answer>",
    "<caption>c</caption><caption>d</caption><think>t</think><answer>a</answer>",
    "<caption>c <think> nested </think></caption><think>t</think><answer>a</answer>",
    "<caption>c</caption><think>t <answer>inner</answer></think><answer>a</answer>",
])
def test_tag_soup_the_reference_regex_accepts(text):
    parsed = parse_response(text)
    match = REFERENCE.fullmatch(text)
    assert match is not None and parsed.format_ok
    assert (parsed.caption, parsed.think, parsed.answer) == tuple(g.strip() for g in match.groups())
    assert_spans_consistent(text, parsed)


@pytest.mark.parametrize("text", [
    "<caption>c</caption><think>t</think><answer>a</answer><answer>",
    "<caption><caption>c</caption><think>t</think><answer>a</answer></caption>",
    "<caption>c</caption><think>t</think><think>u</think><answer>a</answer>x",
    "<CAPTION>c</CAPTION><THINK>t</THINK><ANSWER>a</ANSWER>",
])
def test_tag_soup_the_reference_regex_rejects(text):
    assert REFERENCE.fullmatch(text) is None
    parsed = parse_response(text)
    assert not parsed.format_ok
    assert_spans_consistent(text, parsed)


def test_agrees_with_the_reference_regex_on_random_tag_soup():
    rng = random.Random(1234)
    pieces = TAGS * 3 + ["x", "yz", " ", "\n", "\t", "<", ">", "/", "answer", "</", "<cap"]
    valid = 0
    for trial in range(4000):
        if trial % 3 == 0:  # start from a valid response and perturb it, so both verdicts are common
            parts = ["<caption>", "c", "</caption>", " ", "<think>", "t", "</think>", "<answer>", "a", "</answer>"]
            for _ in range(rng.randint(0, 3)):
                parts.insert(rng.randint(0, len(parts)), rng.choice(pieces))
        else:
            parts = [rng.choice(pieces) for _ in range(rng.randint(0, 14))]
        text = "".join(parts)
        parsed = parse_response(text)
        match = REFERENCE.fullmatch(text)
        assert parsed.format_ok == (match is not None), text
        if match:
            valid += 1
            assert (parsed.caption, parsed.think, parsed.answer) == tuple(g.strip() for g in match.groups()), text
        assert_spans_consistent(text, parsed)
    assert valid > 300  # the generator really exercised valid responses


@pytest.mark.parametrize("value", [None, 42, b"<caption>c</caption>", ["<caption>"], {"text": "x"}])
def test_non_strings_give_an_invalid_empty_parse(value):
    parsed = parse_response(value)
    assert not parsed.format_ok
    assert (parsed.caption, parsed.think, parsed.answer) == (None, None, None)
    assert parsed.spans == {"caption": None, "think": None, "answer": None}


def test_parsed_response_is_frozen():
    parsed = parse_response("<caption>c</caption><think>t</think><answer>a</answer>")
    with pytest.raises(AttributeError):
        parsed.answer = "b"


def test_adversarial_inputs_never_raise_and_stay_linear():
    rng = random.Random(7)
    inputs = [
        "</caption>" * 50_000,
        "<caption>" + "</caption><think>" * 20_000 + "</think>" * 20_000,
        "<caption>c</caption><think>" + "</think> <answer>" * 20_000,
        "<caption>" * 30_000 + "</answer>",
        "<caption>x</caption><think>y</think><answer>" + "9" * 1_000_000 + "</answer>",
        "\x00<caption>\x00</caption><think>\udcff</think><answer>\U0001F600</answer>\x00",
        "".join(rng.choice(TAGS + ["a", " "]) for _ in range(100_000)),
        "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(50_000)),
    ]
    start = time.perf_counter()
    for text in inputs:
        parsed = parse_response(text)
        assert_spans_consistent(text, parsed)
    assert time.perf_counter() - start < 20  # linear scans: well under a second on an idle machine


# ---- token spans ---------------------------------------------------------------------------------------

def test_token_spans_on_hand_made_offsets():
    offsets = [(0, 0), (0, 3), (3, 4), (4, 8), (8, 8), (8, 12), (12, 13)]  # (0, 0): a special token
    spans = {"caption": (3, 8), "think": (5, 9), "answer": None, "empty": (8, 8), "gap": (20, 20)}
    got = token_spans(spans, offsets)
    assert got["caption"] == (2, 4)  # tokens 2..3 overlap chars 3..8
    assert got["think"] == (3, 6)  # partial overlaps count; the zero-width token 4 sits inside the range
    assert got["answer"] is None
    assert got["empty"] == (5, 5)
    assert got["gap"] == (7, 7)


def test_token_spans_accepts_tensors():
    torch = pytest.importorskip("torch")
    offsets = torch.tensor([[0, 2], [2, 5], [5, 9]])
    assert token_spans({"answer": (2, 5)}, offsets) == {"answer": (1, 2)}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def test_protocol_tags_are_single_tokens(tiny_tokenizer):
    for tag in TAGS:
        assert len(tiny_tokenizer(tag, add_special_tokens=False).input_ids) == 1, tag


@pytest.mark.parametrize("prefix", ["", "<|im_start|>assistant\n", "Sure: "])
def test_token_spans_with_the_tiny_tokenizer(tiny_tokenizer, prefix):
    body = format_response("- a red circle\n- label 'B'", "There are 3 circles; 3 + 4 = 7.", "7")
    text = prefix + body
    parsed = parse_response(text)
    encoding = tiny_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ranges = token_spans(parsed.spans, encoding["offset_mapping"])
    ids = encoding["input_ids"]
    for name in SEGMENTS:
        start, end = ranges[name]
        assert tiny_tokenizer.decode(ids[start:end]).strip() == getattr(parsed, name), name
        # the tokens just outside the range are the protocol tags around the content (or newlines)
        assert tiny_tokenizer.decode(ids[end:end + 2]).strip().startswith(f"</{name}>"), name
    order = [ranges[name] for name in SEGMENTS]
    assert order[0][1] <= order[1][0] and order[1][1] <= order[2][0]


def test_token_spans_of_an_invalid_response(tiny_tokenizer):
    text = "<think>count: 2</think> <answer>2"
    parsed = parse_response(text)
    encoding = tiny_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ranges = token_spans(parsed.spans, encoding["offset_mapping"])
    assert ranges["caption"] is None and ranges["answer"] is None
    start, end = ranges["think"]
    assert tiny_tokenizer.decode(encoding["input_ids"][start:end]) == "count: 2"
