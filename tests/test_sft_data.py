"""SFT data path: assistant-only labels, image-safe truncation, packing equivalent to separate samples."""

import io

import pytest
import torch
from PIL import Image

from stages.common.contract.samples import Sample
from stages.common.data.chat import demonstration_text
from stages.common.models.loading import load_policy, load_processor
from stages.common.world import synth
from stages.sft.data import IGNORE, encode_sample, pack, pad, rope_index_of, step_indices, truncate
from stages.sft.loss import summed_nll


@pytest.fixture(scope="module")
def model_and_processor(tiny_path):
    torch.manual_seed(0)
    return load_policy("tiny", train=False), load_processor("tiny")


def _with_demo(samples):
    return [Sample(**{**s.__dict__, "teacher": synth.oracle_demo(s)}) for s in samples]


def _png(color, size=64):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_labels_are_exactly_the_assistant_tokens(model_and_processor):
    model, processor = model_and_processor
    sample = _with_demo(synth.load("synth:train:3"))[1]
    enc = encode_sample(sample, processor, rope_index_of(model), max_length=4096)
    tok = processor.tokenizer
    labelled = enc.input_ids[enc.label_mask]
    assert tok.decode(labelled) == demonstration_text(sample) + "<|im_end|>"
    # every token before the assistant turn, including the 16 image tokens, carries no loss
    first = int(enc.label_mask.nonzero()[0])
    assert not enc.label_mask[:first].any() and enc.label_mask[first:-1].all()
    assert int((enc.mm_token_type_ids[:first] == 1).sum()) == 16


def test_truncation_cuts_before_an_image_never_inside_it(model_and_processor):
    model, processor = model_and_processor
    conv = Sample(id="c", images=[_png("red"), _png("blue")], question="",
                  conversation=[{"role": "user", "content": "<image>What colour?"},
                                {"role": "assistant", "content": "red " * 20},
                                {"role": "user", "content": "And this one? <image>"},
                                {"role": "assistant", "content": "blue"}])
    full = encode_sample(conv, processor, rope_index_of(model), max_length=4096)
    second_image = int((full.mm_token_type_ids == 1).nonzero()[-1])
    cut_at = second_image - 5  # a cut that would land inside the second image
    enc = encode_sample(conv, processor, rope_index_of(model), max_length=cut_at)
    assert enc.n_tokens < cut_at
    assert int((enc.mm_token_type_ids == 1).sum()) == 16          # first image whole, second dropped
    assert enc.image_grid_thw.shape[0] == 1 and enc.pixel_values.shape[0] == int(enc.image_grid_thw.prod())
    assert enc.label_mask.any()
    # a prompt that cannot fit at all is skipped with a reason, not silently cut
    assert isinstance(encode_sample(conv, processor, rope_index_of(model), max_length=10), str)


def test_truncate_keeps_short_sequences_untouched():
    enc = {"input_ids": torch.arange(5), "assistant_masks": torch.tensor([0, 0, 1, 1, 1]).bool(),
           "mm_token_type_ids": torch.zeros(5, dtype=torch.long), "pixel_values": None, "image_grid_thw": None}
    out, kept = truncate(enc, 10)
    assert out is enc and kept == 0


def test_packed_loss_equals_separate_losses(model_and_processor):
    """Packing must not let samples attend to each other and must give each sample its own positions."""
    model, processor = model_and_processor
    samples = _with_demo(synth.load("synth:train:4"))
    items = [encode_sample(s, processor, rope_index_of(model), max_length=4096) for s in samples]
    with torch.no_grad():
        packed, n_packed = summed_nll(model, pack(items))
        separate = [summed_nll(model, pack([e])) for e in items]
        padded, n_padded = summed_nll(model, pad(items, processor.tokenizer.pad_token_id))
    assert n_packed == sum(n for _, n in separate) == n_padded == sum(e.n_targets for e in items)
    torch.testing.assert_close(packed, sum(l for l, _ in separate), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded, packed, rtol=1e-5, atol=1e-4)


def test_padded_loss_and_gradients_equal_separate_samples(model_and_processor):
    """Right-padded without a padding mask: the causal mask alone keeps real tokens off the pads."""
    model, processor = model_and_processor
    items = [encode_sample(s, processor, rope_index_of(model), max_length=4096)
             for s in _with_demo(synth.load("synth:train:4"))]
    assert len({e.n_tokens for e in items}) > 1                    # some rows really are padded

    def loss_and_grads(batches):
        model.zero_grad()
        total = sum(summed_nll(model, b)[0] for b in batches)
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    batch = pad(items, processor.tokenizer.pad_token_id)
    assert batch["attention_mask"] is None
    padded, padded_grads = loss_and_grads([batch])
    separate, separate_grads = loss_and_grads([pad([e], processor.tokenizer.pad_token_id) for e in items])
    torch.testing.assert_close(padded, separate, rtol=1e-5, atol=1e-4)
    for a, b in zip(padded_grads, separate_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_targets_never_cross_samples(model_and_processor):
    model, processor = model_and_processor
    items = [encode_sample(s, processor, rope_index_of(model), max_length=4096)
             for s in _with_demo(synth.load("synth:train:2"))]
    batch = pack(items)
    boundary = items[0].n_tokens - 1  # last token of sample 0 must not predict sample 1's first token
    assert batch["targets"][0, boundary] == IGNORE
    assert batch["position_ids"].shape == (4, 1, sum(e.n_tokens for e in items))
    assert batch["position_ids"][0, 0, items[0].n_tokens] == 0  # text positions restart per sample


def test_step_indices_cover_each_epoch_once_and_are_reproducible():
    n, bs = 20, 4
    epoch0 = [i for s in range(5) for i in step_indices(n, bs, seed=3, step=s)]
    assert sorted(epoch0) == list(range(n))
    epoch1 = [i for s in range(5, 10) for i in step_indices(n, bs, seed=3, step=s)]
    assert sorted(epoch1) == list(range(n)) and epoch1 != epoch0  # each epoch reshuffles
    assert step_indices(n, bs, 3, 0) != step_indices(n, bs, 4, 0)


def test_batched_encoding_equals_one_by_one(model_and_processor):
    from stages.sft.data import encode_batch

    model, processor = model_and_processor
    samples = _with_demo(synth.load("synth:train:6"))
    samples.insert(2, Sample(id="no-target", images=[_png("red")], question="q"))  # skipped with a reason
    # rows of different lengths in one call: multi-turn with two images, and text only
    samples.insert(4, Sample(id="two-images", images=[_png("red"), _png("blue")], question="",
                             conversation=[{"role": "user", "content": "<image>What colour?"},
                                           {"role": "assistant", "content": "red " * 20},
                                           {"role": "user", "content": "And this one? <image>"},
                                           {"role": "assistant", "content": "blue"}]))
    samples.insert(1, Sample(id="text-only", images=[], question="",
                             conversation=[{"role": "user", "content": "Say hi."},
                                           {"role": "assistant", "content": "hi there"}]))
    batched = encode_batch(samples, processor, rope_index_of(model), max_length=4096)
    assert isinstance(batched[3], str)
    tok = processor.tokenizer
    assert tok.decode(batched[1].input_ids[batched[1].label_mask]) == "hi there<|im_end|>"
    assert batched[1].pixel_values is None
    two = batched[5]
    assert tok.decode(two.input_ids[two.label_mask]) == "red " * 20 + "<|im_end|>blue<|im_end|>"
    assert two.image_grid_thw.shape[0] == 2 and int((two.mm_token_type_ids == 1).sum()) == 32
    for s, b in zip(samples, batched):
        one = encode_sample(s, processor, rope_index_of(model), max_length=4096)
        if isinstance(one, str):
            assert one == b
            continue
        for field in ("input_ids", "label_mask", "mm_token_type_ids", "rope_positions", "pixel_values",
                      "image_grid_thw"):
            x, y = getattr(one, field), getattr(b, field)
            assert (x is None and y is None) or torch.equal(x, y), field


def test_mixture_concatenates_unweighted_sources_and_resamples_weighted_ones():
    from stages.sft.run import load_mixture

    plain = load_mixture(["synth:train:30", "synth:test:10"], seed=0)
    assert len(plain.samples) == 40 and len({s.id for s in plain.samples}) == 40
    weighted = load_mixture(["synth:train:30:0.5", "synth:test:10:0.5"], seed=0)
    splits = [s.meta["split"] for s in weighted.samples]
    assert splits.count("train") == 20 and splits.count("test") == 20
    assert len({s.id for s in weighted.samples}) == 40  # resampled duplicates get distinct ids
