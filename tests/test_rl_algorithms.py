"""RLVR algorithms on hand-made tensors: aggregation, PPO-clip, GSPO, KL, GRPO/DAPO advantages."""

import math

import pytest
import torch
from torch.testing import assert_close

from stages.common.policy_update.advantages import dynamic_sampling_keep, group_normalized_advantages, overlong_penalty
from stages.common.policy_update.losses import aggregate, aggregation_normalizer, gspo_loss, kl_penalty, ppo_clip_loss

NAN = float("nan")


def t(values, dtype=torch.float32, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


# ---------------------------------------------------------------- aggregation

# two real rows (lengths 3 and 2) and one fully padded row; padding holds garbage (NaN, 100)
LOSS = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, NAN, NAN], [7.0, 7.0, 7.0, 7.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 3.0),  # (1+2+3+4+5) / 5
        ("seq-mean-token-mean", 3.25),  # (6/3 + 9/2) / 2 = (2 + 4.5) / 2
        ("seq-mean-token-sum", 7.5),  # (6 + 9) / 2
    ],
)
def test_aggregate_modes_ignore_padding(mode, expected):
    loss = t(LOSS, grad=True)
    out = aggregate(loss, torch.tensor(MASK, dtype=torch.bool), mode)
    assert_close(out, torch.tensor(expected))
    out.backward()
    assert torch.isfinite(loss.grad).all()
    assert (loss.grad[torch.tensor(MASK) == 0] == 0).all()  # padded tokens get no gradient


def test_aggregate_gradients_per_mode():
    mask = torch.tensor(MASK, dtype=torch.float32)  # float 0/1 masks work too
    loss = t(LOSS, grad=True)
    aggregate(loss, mask, "token-mean").backward()
    assert_close(loss.grad, mask / 5)  # every valid token weighs 1/5
    loss = t(LOSS, grad=True)
    aggregate(loss, mask, "seq-mean-token-mean").backward()
    # row 0: 1/(2 seqs * 3 tokens) = 1/6; row 1: 1/(2 * 2) = 1/4
    assert_close(loss.grad, torch.tensor([[1 / 6] * 3 + [0.0], [0.25, 0.25, 0, 0], [0.0] * 4]))


def test_aggregation_normalizer_and_micro_batches_match_one_batch():
    mask = torch.tensor(MASK, dtype=torch.bool)
    assert aggregation_normalizer(mask, "token-mean").item() == 5  # 3 + 2 valid tokens
    assert aggregation_normalizer(mask, "seq-mean-token-mean").item() == 2  # the padded row is no sequence
    loss = t(LOSS)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        full = aggregate(loss, mask, mode)
        n = aggregation_normalizer(mask[:1], mode) + aggregation_normalizer(mask[1:], mode)
        split = aggregate(loss[:1], mask[:1], mode, normalizer=n) + aggregate(loss[1:], mask[1:], mode, normalizer=n)
        assert_close(split, full)
    # token-mean micro-batch: 6/5 + 9/5 = 3.0; python number normaliser works too
    micro = [aggregate(loss[i:i + 1], mask[i:i + 1], "token-mean", normalizer=5) for i in range(3)]
    assert_close(sum(micro), torch.tensor(3.0))


def test_aggregate_no_valid_token_is_zero_and_differentiable():
    loss = t([[NAN, 1.0]], grad=True)
    out = aggregate(loss, torch.zeros(1, 2, dtype=torch.bool), "token-mean")
    assert out.item() == 0.0
    out.backward()
    assert (loss.grad == 0).all()


def test_aggregate_rejects_unknown_mode_and_bad_mask():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(t([[1.0]]), torch.ones(1, 1), "seq-sum")
    with pytest.raises(ValueError, match="mask"):
        aggregate(t([[1.0, 2.0]]), torch.ones(1, 3), "token-mean")


# ---------------------------------------------------------------- PPO-clip

def _ppo_batch():
    # old_logp = 0, so ratio = exp(logp); row 1's last token is padding holding NaN
    ratios = [[1.5, 0.5, 1.1, 1.0], [0.5, 1.5, 1.1, 1.0]]
    logp = torch.log(torch.tensor(ratios))
    logp[1, 3] = NAN
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    mask[0, 3] = False  # both rows use 3 tokens
    return logp.requires_grad_(), torch.zeros(2, 4), mask


def test_ppo_clip_both_sides_values_stats_and_gradients():
    logp, old, mask = _ppo_batch()
    adv = t([1.0, -1.0])  # per-sequence, broadcast over tokens
    loss, stats = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # row 0 (A=+1): r=1.5 > 1.28 -> max(-1.5, -1.28) = -1.28 (clipped high)
    #               r=0.5 -> max(-0.5, -0.8) = -0.5 (below 1-clip with A>0: not clipped)
    #               r=1.1 -> -1.1
    # row 1 (A=-1): r=0.5 < 0.8 -> max(0.5, 0.8) = 0.8 (clipped low)
    #               r=1.5 -> max(1.5, 1.28) = 1.5 (above 1+clip with A<0: not clipped)
    #               r=1.1 -> 1.1
    # token-mean: (-1.28 - 0.5 - 1.1 + 0.8 + 1.5 + 1.1) / 6 = 0.52 / 6
    assert_close(loss, torch.tensor(0.52 / 6))
    assert_close(stats["clipfrac_high"], torch.tensor(1 / 6))
    assert_close(stats["clipfrac_low"], torch.tensor(1 / 6))
    assert_close(stats["clipfrac"], torch.tensor(2 / 6))
    assert_close(stats["ratio_mean"], torch.tensor(6.2 / 6))  # (1.5+0.5+1.1)*2 / 6
    assert_close(stats["ratio_max"], torch.tensor(1.5))
    assert_close(stats["ratio_min"], torch.tensor(0.5))
    # k3 = r - 1 - ln r: 1.5 -> 0.0945349, 0.5 -> 0.1931472, 1.1 -> 0.0046898; 2 * sum / 6
    assert_close(stats["approx_kl"], torch.tensor(0.0974573), atol=1e-6, rtol=0)
    assert stats["clipfrac_dual"].item() == 0.0
    assert not any(v.requires_grad for v in stats.values())

    loss.backward()
    # d/d logp of -A r is -A r where unclipped, 0 where clipped; times 1/6 (token-mean), 0 at padding
    expected_grad = torch.tensor([[0.0, -0.5, -1.1, 0.0], [0.0, 1.5, 1.1, 0.0]]) / 6
    assert_close(logp.grad, expected_grad)


def test_ppo_per_token_advantages_equal_broadcast_and_mixed_signs():
    logp, old, mask = _ppo_batch()
    per_seq, _ = ppo_clip_loss(logp, old, t([1.0, -1.0]), mask)
    per_tok, _ = ppo_clip_loss(logp, old, t([[1.0] * 4, [-1.0] * 4]), mask)
    assert_close(per_tok, per_seq)
    # row 0 with A = [-1, -1, 2]: r=1.5 -> max(1.5, 1.2) = 1.5; r=0.5 -> max(0.5, 0.8) = 0.8 (clipped low);
    # r=1.1 -> -2.2; row 1 as before: 0.8 + 1.5 + 1.1 = 3.4 -> (1.5 + 0.8 - 2.2 + 3.4) / 6 = 3.5 / 6
    adv = t([[-1.0, -1.0, 2.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    loss, stats = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert_close(loss, torch.tensor(3.5 / 6))
    assert_close(stats["clipfrac_low"], torch.tensor(2 / 6))
    assert_close(stats["clipfrac_high"], torch.tensor(0.0))


def test_ppo_dual_clip_bounds_negative_advantage_loss():
    logp = torch.log(t([[5.0, 2.0]])).requires_grad_()
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = ppo_clip_loss(logp, old, t([-1.0]), mask, dual_clip=3.0)
    # r=5: max(5, 1.2) = 5 -> min(5, 3) = 3 (dual clip); r=2: 2 < 3 -> 2. mean (3 + 2)/2 = 2.5
    assert_close(loss, torch.tensor(2.5))
    assert_close(stats["clipfrac_dual"], torch.tensor(0.5))
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, 1.0]]))  # dual-clipped token constant; r=2 -> -A r / 2 = 1
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(logp, old, t([-1.0]), mask, dual_clip=0.5)


def test_ppo_seq_mean_modes_weigh_sequences():
    # row 0: 1 token r=1 A=1 -> -1; row 1: 3 tokens r=1 A=-1 -> +1 each
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    adv = t([1.0, -1.0])
    old = torch.zeros(2, 3)
    # token-mean (-1 + 3) / 4; seq-mean-token-mean (-1 + 1) / 2; seq-mean-token-sum (-1 + 3) / 2
    for agg, expected in [("token-mean", 0.5), ("seq-mean-token-mean", 0.0), ("seq-mean-token-sum", 1.0)]:
        assert_close(ppo_clip_loss(logp, old, adv, mask, agg=agg)[0], torch.tensor(expected))


# ---------------------------------------------------------------- GSPO

def test_gspo_ratio_is_length_normalised():
    # the same per-token log-ratio 0.1 over 2 and over 4 tokens gives s = exp(0.1) for both
    logp = torch.full((2, 4), 0.1)
    logp[0, 2:] = NAN  # padding
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    _, stats = gspo_loss(logp, torch.zeros(2, 4), t([1.0, 1.0]), mask, clip_low=0.5, clip_high=0.5)
    assert_close(stats["ratio_max"], torch.tensor(math.exp(0.1)))
    assert_close(stats["ratio_min"], torch.tensor(math.exp(0.1)))


def test_gspo_unclipped_value_and_hand_derived_gradients():
    # row 0: log-ratios [0.3, -0.1] (mean 0.1), A=2; row 1: [0.1]*4 (mean 0.1), A=-1; s = e^0.1 for both
    old = t([[0.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    logp = t([[0.3, -0.1, NAN, NAN], [-0.9, -0.9, -0.9, -0.9]], grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss, stats = gspo_loss(logp, old, t([2.0, -1.0]), mask, clip_low=0.2, clip_high=0.2)
    # seq-mean-token-mean: (mean_t(-2 s) + mean_t(+1 s)) / 2 = -e^0.1 / 2 = -0.5525855
    assert_close(loss, torch.tensor(-0.5525855))
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    # d loss / d logp_it = -A_i s_i / (|y_i| * 2 seqs): row 0: -2 e^0.1 / 4 = -0.5525855;
    # row 1: e^0.1 / 8 = 0.1381464; padding 0
    expected = torch.tensor([[-0.5525855, -0.5525855, 0.0, 0.0], [0.1381464] * 4])
    assert_close(logp.grad, expected)


def test_gspo_tiny_clip_ranges_are_sequence_level():
    # float64 so differences of 1e-4 around 1 are exact enough; every row has 2 tokens
    d = torch.float64
    log_ratio = torch.tensor([1e-3, -1e-3, 2e-4, 1e-3], dtype=d)[:, None].expand(4, 2).clone()
    logp = log_ratio.requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=d)
    mask = torch.ones(4, 2, dtype=torch.bool)
    loss, stats = gspo_loss(logp, torch.zeros(4, 2, dtype=d), adv, mask)  # clip 3e-4 / 4e-4
    # row 0: s = e^0.001 = 1.0010005 > 1.0004, A>0 -> clipped high: -1.0004
    # row 1: s = e^-0.001 = 0.9990005 < 0.9997, A<0 -> clipped low: +0.9997
    # row 2: s = e^0.0002 = 1.0002000 inside -> -1.0002000
    # row 3: s = e^0.001 with A<0 -> not clipped: +1.0010005
    # mean: (-1.0004 + 0.9997 - 1.00020002 + 1.00100050) / 4 = 2.5120041e-05
    assert_close(loss, torch.tensor(2.5120041e-05, dtype=d), atol=1e-12, rtol=1e-6)
    assert_close(stats["clipfrac_high"], torch.tensor(0.25, dtype=d))
    assert_close(stats["clipfrac_low"], torch.tensor(0.25, dtype=d))
    loss.backward()
    # clipped rows: 0; row 2: -A s / (2 tokens * 4 seqs) = -1.0002000/8; row 3: +1.0010005/8
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-0.125025003, -0.125025003], [0.125125063, 0.125125063]], dtype=d)
    assert_close(logp.grad, expected, atol=1e-9, rtol=0)


# ---------------------------------------------------------------- KL

def test_kl_penalty_k1_k3():
    logp, ref = t([[0.0, -1.0, -0.5]]), t([[-1.0, 0.0, -0.5]])
    assert_close(kl_penalty(logp, ref, "k1"), t([[1.0, -1.0, 0.0]]))  # logp - ref
    # k3 with d = ref - logp = [-1, 1, 0]: e^-1 + 1 - 1 = 0.3678794; e - 1 - 1 = 0.7182818; 0
    assert_close(kl_penalty(logp, ref, "k3"), t([[0.3678794, 0.7182818, 0.0]]))
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k2")


def test_kl_penalty_k3_gradient_and_masking_through_aggregate():
    logp = t([[0.0, NAN]], grad=True)
    ref = t([[-1.0, -float("inf")]])
    mask = torch.tensor([[True, False]])
    kl = kl_penalty(logp, ref, "k3", mask=mask)
    assert_close(kl, t([[0.3678794, 0.0]]))  # padding zeroed, not NaN
    aggregate(kl, mask, "token-mean").backward()
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = -e^(ref-logp) + 1 = 1 - e^-1 = 0.6321206; padding 0
    assert_close(logp.grad, t([[0.6321206, 0.0]]))


# ---------------------------------------------------------------- GRPO advantages

def test_grpo_std_normalised_with_identical_and_single_groups():
    rewards = t([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 4, 4, 9])
    adv = group_normalized_advantages(rewards, groups)
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.5773503; 0.5 / (0.5773503 + 1e-6) = 0.8660239
    # group 4: identical -> 0; group 9: one response -> mean 0, std 1: 0.5 / (1 + 1e-6) = 0.4999995
    expected = t([0.8660239, -0.8660239, -0.8660239, 0.8660239, 0.0, 0.0, 0.4999995])
    assert_close(adv, expected)
    assert adv.dtype == torch.float32


def test_grpo_without_std_normalisation():
    adv = group_normalized_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5], [0, 0, 0, 0, 4, 4, 9], normalize_std=False)
    # r - group mean; the single response keeps its reward (mean 0)
    assert_close(adv, t([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.5]))


def test_grpo_interleaved_string_ids_and_dtype():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    adv = group_normalized_advantages(rewards, ["a", "b", "a", "b"])
    # a: [1, 3] mean 2, std sqrt(2): 1 / (1.4142136 + 1e-6) = 0.7071063
    # b: [2, 6] mean 4, std sqrt(8): 2 / (2.8284271 + 1e-6) = 0.7071065
    assert_close(adv, t([-0.7071063, -0.7071065, 0.7071063, 0.7071065]))
    assert adv.dtype == torch.float32
    with pytest.raises(ValueError, match="group_ids"):
        group_normalized_advantages(rewards, [0, 1, 0])


# ---------------------------------------------------------------- DAPO overlong penalty

def test_overlong_penalty_edges():
    # max 10, buffer 4: ramp from length 6 (0) to length 10 (-1), then stays -1
    lengths = torch.tensor([0, 6, 7, 8, 10, 11, 100])
    assert_close(overlong_penalty(lengths, 10, 4), t([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]))
    assert_close(overlong_penalty(lengths, 10, 4, penalty_factor=2.0), t([0.0, 0.0, -0.5, -1.0, -2.0, -2.0, -2.0]))
    # paper setting: max 8192, buffer 4096: exactly at 4096 -> 0, 6144 -> -0.5, 8192 -> -1
    assert_close(overlong_penalty([4096, 4097, 6144, 8192], 8192), t([0.0, -1 / 4096, -0.5, -1.0]))


def test_overlong_penalty_buffer_longer_than_max_and_zero_buffer():
    # buffer 8 > max 4 is shortened to 4: ramp from 0 at length 0 to -1 at length 4
    assert_close(overlong_penalty([0, 1, 4, 5], 4, 8), t([0.0, -0.25, -1.0, -1.0]))
    # buffer 0: hard step above max
    assert_close(overlong_penalty([9, 10, 11], 10, 0), t([0.0, 0.0, -1.0]))
    with pytest.raises(ValueError):
        overlong_penalty([1], 0)


# ---------------------------------------------------------------- DAPO dynamic sampling

def test_dynamic_sampling_drops_all_equal_groups():
    acc = t([0, 0, 0, 1, 1, 1, 0, 1, 0, 1])
    groups = torch.tensor([5, 5, 5, 7, 7, 7, 9, 9, 9, 11])
    keep = dynamic_sampling_keep(acc, groups)
    # all-0 (5) and all-1 (7) dropped; mixed (9) kept; single response (11) kept (its GN advantage is not 0)
    assert keep.response_mask.tolist() == [False] * 6 + [True] * 4
    assert keep.group_mask.tolist() == [False, False, True, True]
    assert keep.group_keys.tolist() == [5, 7, 9, 11]
    assert (keep.num_kept_groups, keep.num_groups) == (2, 4)
    assert acc[keep.response_mask].tolist() == [0.0, 1.0, 0.0, 1.0]
