"""Shared-prefix decode attention and the two-level sampler of the hf engine."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from stages.common.policy_update.logprobs import banned_token_mask, sampling_logprobs
from stages.common.rollout import SamplingParams
from stages.common.rollout import shared_prefix as sp
from stages.common.rollout.hf import HFEngine, inverse_cdf_sample, sample_tokens
from tests.test_rollout import policy, two_prompts, with_logit_bias  # noqa: F401  (module fixture)


def prefill_cache(prefix_k, prefix_v):
    cache = DynamicCache()
    layer = DynamicLayer()
    layer.lazy_initialization(prefix_k, prefix_v)
    layer.keys, layer.values = prefix_k, prefix_v
    cache.layers = [layer]
    return cache


def test_attention_equals_sdpa_over_prompt_plus_own_tokens():
    """3 prompts, left padding of 0/2/4, GQA (4 heads over 2 kv heads), rows then dropped unevenly."""
    torch.manual_seed(0)
    P, n, kvh, H, D, Lp, steps = 3, 4, 2, 4, 8, 6, 5
    prefix_k, prefix_v = torch.randn(P, kvh, Lp, D), torch.randn(P, kvh, Lp, D)
    prompt_mask = torch.ones(P, Lp, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[2, :4] = 0
    cache = prefill_cache(prefix_k, prefix_v)
    groups = sp.install(cache, P, n, prompt_mask, extra_tokens=2)     # grows past 2 below
    layer = cache.layers[0]
    own_k, own_v = torch.randn(P * n, kvh, steps, D), torch.randn(P * n, kvh, steps, D)
    for t in range(steps):
        layer.update(own_k[:, :, t:t + 1], own_v[:, :, t:t + 1])
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 10, 11])          # prompt 0: 3 rows, prompt 1: 1 row, prompt 2: 4 rows
    cache.batch_select_indices(keep)
    groups.select(keep)
    rows = keep.numel()
    query = torch.randn(rows, H, 1, D)
    got, _ = sp.shared_prefix_attention(SimpleNamespace(layer_idx=0), query, layer.keys, layer.values, None,
                                        scaling=0.3, prefix_cache=cache)

    group = keep // n
    full_k = torch.cat([prefix_k[group], own_k[keep]], 2).repeat_interleave(H // kvh, 1)
    full_v = torch.cat([prefix_v[group], own_v[keep]], 2).repeat_interleave(H // kvh, 1)
    mask = torch.cat([prompt_mask[group].bool(), torch.ones(rows, steps, dtype=torch.bool)], 1)[:, None, None, :]
    want = F.scaled_dot_product_attention(query, full_k, full_v, attn_mask=mask, scale=0.3).transpose(1, 2)
    assert got.shape == (rows, 1, H, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert layer.attended and layer.get_seq_length() == Lp + steps


def test_unattended_layers_raise():
    cache = prefill_cache(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    sp.install(cache, 1, 2, torch.ones(1, 2, dtype=torch.long), extra_tokens=1)
    with pytest.raises(RuntimeError, match="shared_prefix=False"):
        sp.check_attended(cache)


def test_text_attention_restored_on_error(policy):  # noqa: F811
    model, _ = policy
    before = model.config.get_text_config()._attn_implementation
    with pytest.raises(ValueError):
        with sp.text_attention(model, sp.IMPLEMENTATION):
            assert model.config.get_text_config()._attn_implementation == sp.IMPLEMENTATION
            raise ValueError
    assert model.config.get_text_config()._attn_implementation == before


EOS_BIAS = 5.0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_same_samples_with_and_without_shared_prefix(policy, temperature):  # noqa: F811
    """Same seed: the same tokens and (within float error) the same logprobs, with rows finishing early
    (EOS made likely) so compaction drops rows of some prompts and not others."""
    model, processor = policy
    model = with_logit_bias(model, {processor.tokenizer.eos_token_id: EOS_BIAS})
    params = SamplingParams(n=5, max_new_tokens=12, temperature=temperature, seed=11)
    shared = HFEngine(model, processor, shared_prefix=True, compact_fraction=0.1).generate(two_prompts(), params)
    repeated = HFEngine(model, processor, shared_prefix=False, compact_fraction=0.1).generate(two_prompts(), params)
    pairs = [(a, b) for ga, gb in zip(shared, repeated) for a, b in zip(ga, gb)]
    assert [a.token_ids for a, _ in pairs] == [b.token_ids for _, b in pairs]
    assert [a.finish_reason for a, _ in pairs] == [b.finish_reason for _, b in pairs]
    for a, b in pairs:
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    if temperature > 0:
        assert len({len(a.token_ids) for a, _ in pairs}) > 2     # rows did finish at different steps


def test_inverse_cdf_sample_matches_the_distribution():
    """A vocabulary that is not a multiple of the block, zero-probability tokens (never drawn), and
    unnormalised weights: frequencies of 200,000 draws match within 0.005."""
    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.5, 0.0, 2.0, 0.0, 0.0, 1.5, 0.0])   # 11 tokens, block 4
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([inverse_cdf_sample(weights.expand(1000, -1), g, block=4) for _ in range(200)])
    freq = torch.bincount(draws, minlength=11).float() / draws.numel()
    assert freq[weights == 0].sum() == 0
    torch.testing.assert_close(freq, weights / weights.sum(), atol=5e-3, rtol=0)


def test_inverse_cdf_sample_one_hot_rows_and_block_edges():
    probs = torch.zeros(5, 9)
    for row, tok in enumerate([0, 3, 4, 7, 8]):        # block 4: first/last of blocks, the tail block
        probs[row, tok] = 1.0
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert inverse_cdf_sample(probs, g, block=4).tolist() == [0, 3, 4, 7, 8]


def test_sample_tokens_logprob_follows_the_convention():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    banned = banned_token_mask(50, [3, 4])
    g = torch.Generator().manual_seed(2)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.5), (0.0, 0, 1.0)]:
        tok, logp = sample_tokens(logits, temperature, top_k, top_p, banned, g)
        want = sampling_logprobs(logits, temperature, banned).gather(-1, tok[:, None]).squeeze(-1)
        torch.testing.assert_close(logp, want, atol=1e-6, rtol=0)
        assert not set(tok.tolist()) & {3, 4}
