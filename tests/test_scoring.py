"""Segment scoring: the shared-prompt and prefix layouts equal the separate layout (scores, gradients, the router's
aux loss); warmup learns."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from stages.align.scoring import (
    PreferencePair,
    clip_scores,
    encode_prompt,
    encode_segment,
    pairwise_accuracy,
    prefix_layout_mask,
    score_groups,
    score_segments,
    shared_layout_mask,
    warmup_step,
)
from stages.common.models.discriminator import upcycle
from stages.common.models.loading import load_processor
from stages.common.rollout.base import RolloutPrompt
from tests.conftest import LEARNING_SEED

SEGMENTS = ["- three red circles on the left\n- one blue square at the top",
            "3 + 1 = 4. So the answer is 4.",
            "",                                    # a format-invalid rollout with no caption
            "the answer is",
            "first count the circles: 3. then the squares: 1. 3 plus 1 equals 4. so the answer is 4. " * 2,
            "<|image_pad|> text that names a vision token"]


def _image(seed, size=(64, 48)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _prompt(question="How many circles are there?", seed=0, size=(64, 48)):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    return RolloutPrompt(messages=[{"role": "system", "content": "Answer in the protocol format."}, user],
                         images=[_image(seed, size)])


@pytest.fixture(scope="module")
def processor():
    return load_processor("tiny")


@pytest.fixture(scope="module")
def disc():
    # a larger value head than the default makes scores O(1), so a 1e-4 agreement means something
    return upcycle("tiny", seed=1, value_head_std=0.1)


def _single_sequence_score(disc, processor, prompt, segment):
    """Ground truth: one unpadded sequence, the model's own mask and positions."""
    enc = encode_prompt(processor, prompt)
    seg = torch.tensor(encode_segment(processor.tokenizer, segment))
    ids = torch.cat([enc.input_ids, seg])[None]
    mm = torch.cat([enc.mm_token_type_ids, torch.zeros_like(seg)])[None]
    out = disc(input_ids=ids, mm_token_type_ids=mm, pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw)
    return out.token_values[0, -1]


def test_shared_layout_mask_blocks():
    blocks = torch.tensor([[-1, -1, 0, 0, 1, 1, 1, -2]])
    visible = shared_layout_mask(blocks, torch.float32)[0, 0] == 0
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0, 0],
                         [1, 1, 0, 0, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(visible, want)


def test_prefix_layout_mask_blocks():
    """Packed segment rows over a 3-token prompt cache whose first column is left padding."""
    prompt_visible = torch.tensor([[False, True, True]])
    blocks = torch.tensor([[0, 0, 1, -2]])
    visible = prefix_layout_mask(prompt_visible, blocks, torch.float32)[0, 0] == 0
    want = torch.tensor([[0, 1, 1, 1, 0, 0, 0],
                         [0, 1, 1, 1, 1, 0, 0],
                         [0, 1, 1, 0, 0, 1, 0],
                         [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(visible, want)


def test_layouts_agree_with_an_image_and_uneven_segments(disc, processor):
    prompt = _prompt()
    with torch.no_grad():
        separate = score_segments(disc, processor, prompt, SEGMENTS, layout="separate")
        shared = score_segments(disc, processor, prompt, SEGMENTS, layout="shared")
        prefix = score_segments(disc, processor, prompt, SEGMENTS, layout="prefix")
        truth = torch.stack([_single_sequence_score(disc, processor, prompt, s) for s in SEGMENTS])
    assert separate.shape == (len(SEGMENTS),)
    assert separate.abs().max() > 0.1  # not trivially zero
    assert (shared - separate).abs().max() < 1e-4
    assert (prefix - separate).abs().max() < 1e-4
    assert (separate - truth).abs().max() < 1e-4
    assert len({round(float(s), 4) for s in shared}) == len(SEGMENTS)  # segments do not see each other
    assert len({round(float(s), 4) for s in prefix}) == len(SEGMENTS)  # nor when packed into one row


def test_layouts_agree_on_gradients(disc, processor):
    prompt = _prompt(seed=3)
    weights = torch.linspace(-1.0, 1.5, len(SEGMENTS))
    grads = {}
    for layout in ("separate", "shared", "prefix"):
        disc.zero_grad(set_to_none=True)
        (score_segments(disc, processor, prompt, SEGMENTS, layout=layout) * weights).sum().backward()
        grads[layout] = {n: p.grad.clone() for n, p in disc.named_parameters() if p.grad is not None}
    disc.zero_grad(set_to_none=True)
    for layout in ("shared", "prefix"):
        assert grads[layout].keys() == grads["separate"].keys()
        assert any(n.startswith("model.visual.") for n in grads[layout])  # the image is in the graph
        assert any("experts" in n for n in grads[layout])
        worst = max(float((grads[layout][n] - grads["separate"][n]).abs().max()) for n in grads[layout])
        assert worst < 1e-4, layout


def test_prefix_layout_gives_the_shared_layouts_router_aux_loss(disc, processor):
    """Both passes' router logits (the prompt once, every segment token) enter one load-balancing loss: the
    same tokens as the shared layout's one row, so the same value, and its gradient reaches the routers."""
    prompts = [_prompt(seed=8), _prompt("Which shape is largest?", seed=9, size=(48, 64))]
    groups = [SEGMENTS, SEGMENTS[1:4]]
    aux = {}
    for layout in ("shared", "prefix"):
        disc.zero_grad(set_to_none=True)
        result = score_groups(disc, processor, prompts, groups, layout, output_router_logits=True)
        result.backward(result.aux_loss)
        aux[layout] = (float(result.aux_loss.detach()), {n: p.grad.clone() for n, p in disc.named_parameters()
                                                if p.grad is not None and "mlp.gate" in n})
    disc.zero_grad(set_to_none=True)
    assert aux["prefix"][0] > 0 and abs(aux["prefix"][0] - aux["shared"][0]) < 1e-5
    assert aux["prefix"][1].keys() == aux["shared"][1].keys() and aux["prefix"][1]
    for name, grad in aux["prefix"][1].items():
        assert torch.allclose(grad, aux["shared"][1][name], atol=1e-6, rtol=1e-4), name


def test_several_groups_split_rows_and_text_only(disc, processor):
    prompts = [_prompt("How many circles?", seed=4), _prompt("Which shape is largest?", seed=5, size=(48, 64))]
    groups = [SEGMENTS[:4], SEGMENTS[2:]]
    with torch.no_grad():
        separate = score_groups(disc, processor, prompts, groups, "separate")
        shared = score_groups(disc, processor, prompts, groups, "shared")
        split = score_groups(disc, processor, prompts, groups, "shared", max_row_tokens=80)
        text_sep = score_groups(disc, processor, prompts, groups, "separate", text_only=True)
        text_shared = score_groups(disc, processor, prompts, groups, "shared", text_only=True)
        # prefix: prompts of different lengths (image sizes) are left-padded in one pass
        prefix = score_groups(disc, processor, prompts, groups, "prefix")
        prefix_split = score_groups(disc, processor, prompts, groups, "prefix", max_row_tokens=80)
        text_prefix = score_groups(disc, processor, prompts, groups, "prefix", text_only=True)
    assert [len(s) for s in shared.scores] == [4, 4]
    assert (shared.flat - separate.flat).abs().max() < 1e-4
    assert (split.flat - separate.flat).abs().max() < 1e-4 and split.num_rows > shared.num_rows
    assert (prefix.flat - separate.flat).abs().max() < 1e-4
    assert (prefix_split.flat - separate.flat).abs().max() < 1e-4 and prefix_split.num_chunks > 1
    assert (text_prefix.flat - text_sep.flat).abs().max() < 1e-4
    assert (text_shared.flat - text_sep.flat).abs().max() < 1e-4
    assert (text_shared.flat - shared.flat).abs().max() > 1e-3  # withholding the image changes scores
    assert shared.num_tokens < separate.num_tokens


def test_text_only_discriminator_withholds_images(processor):
    disc = upcycle("tiny", seed=2, text_only=True, value_head_std=0.1)
    prompt = _prompt()
    bare = RolloutPrompt(messages=[prompt.messages[0], {"role": "user", "content": [
        {"type": "text", "text": "How many circles are there?"}]}])
    with torch.no_grad():
        shared = score_segments(disc, processor, prompt, SEGMENTS[:3])
        separate = score_segments(disc, processor, prompt, SEGMENTS[:3], layout="separate")
        no_image = score_segments(disc, processor, bare, SEGMENTS[:3], layout="separate")
    assert (shared - separate).abs().max() < 1e-4 and (separate - no_image).abs().max() < 1e-6
    with pytest.raises(ValueError, match="text-only"):
        score_segments(disc, processor, prompt, SEGMENTS[:1], text_only=False)


def test_dense_variant_layouts_agree(processor):
    disc = upcycle("tiny", dense=True, value_head_std=0.1)
    prompt = _prompt(seed=7)
    with torch.no_grad():
        shared = score_segments(disc, processor, prompt, SEGMENTS)
        prefix = score_segments(disc, processor, prompt, SEGMENTS, layout="prefix")
        separate = score_segments(disc, processor, prompt, SEGMENTS, layout="separate")
    assert (shared - separate).abs().max() < 1e-4
    assert (prefix - separate).abs().max() < 1e-4


def test_prefix_layout_refuses_a_checkpointed_discriminator(processor):
    """Gradient checkpointing makes transformers drop the KV cache the prefix layout's segments read."""
    from stages.common.models.loading import enable_checkpointing

    disc = upcycle("tiny", seed=1, value_head_std=0.1)
    enable_checkpointing(disc)
    disc.train()
    with pytest.raises(RuntimeError, match="no KV cache"):
        score_segments(disc, processor, _prompt(), SEGMENTS[:2], layout="prefix")
    assert score_segments(disc, processor, _prompt(), SEGMENTS[:2], layout="shared").requires_grad


def test_clip_and_bad_layout(disc, processor):
    assert torch.equal(clip_scores(torch.tensor([-12.0, 3.0, 10.5])), torch.tensor([-10.0, 3.0, 10.0]))
    with pytest.raises(ValueError, match="layout"):
        score_segments(disc, processor, _prompt(), ["x"], layout="packed")


# ------------------------------------------------------------------------------------------ warmup

_COLORS = "red green blue yellow purple orange".split()
_SHAPES = "circles squares triangles stars".split()


def _synthetic_pair(rng: random.Random) -> PreferencePair:
    """Teacher segments are consistent; the student's are word-shuffled, or carry wrong numbers."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c1, c2 = rng.sample(_COLORS, 2)
    s1, s2 = rng.sample(_SHAPES, 2)
    prompt = RolloutPrompt(messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"How many {s1} and {s2} are there in total?"}]}],
        images=[_image(rng.randint(0, 10 ** 6), (64, 64))])
    caption = f"- there are {a} {c1} {s1} on the left\n- there are {b} {c2} {s2} on the right"
    think = (f"first count the {s1}: {a}. then count the {s2}: {b}. {a} plus {b} equals {a + b}. "
             f"so the answer is {a + b}.")
    if rng.random() < 0.5:
        def shuffle(text):
            words = text.split()
            rng.shuffle(words)
            return " ".join(words)
        return PreferencePair(prompt, caption, think, shuffle(caption), shuffle(think))
    wrong = rng.choice([x for x in range(2, 19) if x != a + b])
    bad_think = think.rsplit(" ", 1)[0] + f" {wrong}."
    return PreferencePair(prompt, caption, think, caption.replace(f" {a} ", f" {rng.randint(10, 99)} "), bad_think)


@pytest.mark.learning
def test_warmup_learns_to_rank_teacher_above_corrupted_student(processor, record_learning):
    torch.manual_seed(LEARNING_SEED)
    rng = random.Random(LEARNING_SEED)
    train = [_synthetic_pair(rng) for _ in range(256)]
    held_out = [_synthetic_pair(rng) for _ in range(96)]
    disc = upcycle("tiny", seed=LEARNING_SEED)
    optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-3, weight_decay=0.0)
    before = pairwise_accuracy(disc, processor, held_out)
    for step in range(48):
        metrics = warmup_step(disc, optimizer, train[step * 8 % 256:][:8], processor)
    assert {"loss", "bt_caption", "bt_think", "aux_loss", "acc_caption", "acc_think"} <= metrics.keys()
    assert metrics["aux_loss"] > 0
    after = pairwise_accuracy(disc, processor, held_out)
    record_learning("held-out pairwise accuracy before, reported", before["mean"], 0.7, above=False)
    record_learning("held-out pairwise accuracy after", after["mean"], 0.8)
    # Chance is 0.5. Measured on these 96 held-out pairs (issue 37, benchmarks/results/learning-spread.md): after
    # 48 steps 0.896-0.969 over 7 runs (seeds 0-3; AVX512, AVX2 and default kernels; mean 0.942, sd 0.027); the
    # old bar, 0.9, sat 1.6 sd under that mean and seed 2 missed it (0.896); longer warmups did not narrow it
    # (seed 0, default kernels: 0.917, 0.891, 0.917 at 48, 72, 96 steps). 0.8 is chance + 0.3 and 5.3 sd under
    # the mean. Before training the pairs rank at 0.39-0.59 (reported: an untrained judge's ranking is its
    # random init's, not a property of the code).
    assert after["mean"] > 0.8, after
