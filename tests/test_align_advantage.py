"""PRISM alignment advantage and discriminator losses on hand-made scores (docs/method.md)."""

import pytest
import torch
from torch.testing import assert_close

from stages.align.advantage import (
    acc_gated_advantages,
    bradley_terry_loss,
    prism_advantages,
    rlvr_mixed_advantages,
    score_l2,
)

NAN = float("nan")
EPS = 1e-6


def t(values, dtype=torch.float32, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def test_all_valid_group_matches_formula():
    # caption [1, 2, 3]: mean 2, std 1 -> GN = [-1, 0, 1] / (1 + 1e-6)
    # think [2, 4, 6]:   mean 4, std 2 -> GN = [-2, 0, 2] / (2 + 1e-6)
    # A = 0.5 * (-0.999999) + 0.5 * (-0.9999995) = -0.99999925, 0, +0.99999925
    adv = prism_advantages(t([1.0, 2.0, 3.0]), t([2.0, 4.0, 6.0]), [True, True, True], [0, 0, 0])
    assert_close(adv, t([-0.99999925, 0.0, 0.99999925]))


def test_invalid_response_gets_lowest_valid_minus_one_and_penalty():
    # caption [1, 2, NaN(invalid)] -> [1, 2, 0]: mean 1, std 1 -> GN [0, 1, -1] / (1 + eps)
    # think   [4, 3, 100(invalid)] -> [4, 3, 2]: mean 3, std 1 -> GN [1, 0, -1] / (1 + eps)
    caption, think, ok = t([1.0, 2.0, NAN]), t([4.0, 3.0, 100.0]), [True, True, False]
    adv = prism_advantages(caption, think, ok, [3, 3, 3])
    # A = 0.5*[0, 1, -1] + 0.5*[1, 0, -1] - 1.5*[0, 0, 1], GN parts times 1/(1+1e-6) = 0.999999
    assert_close(adv, t([0.4999995, 0.4999995, -0.999999 - 1.5]))
    # alpha 0.25, penalty 1: 0.25*[0, 1, -1] + 0.75*[1, 0, -1] - [0, 0, 1] = [0.75, 0.25, -2]
    adv = prism_advantages(caption, think, ok, [3, 3, 3], alpha=0.25, format_penalty=1.0)
    assert_close(adv, t([0.75, 0.25, -2.0]), atol=1e-5, rtol=0)


def test_one_valid_one_invalid_pair():
    # caption [5, inv] -> [5, 4]: mean 4.5, std sqrt(0.5) = 0.7071068; 0.5 / 0.7071078 = 0.7071058
    # think   [1, inv] -> [1, 0]: same deviations -> same GN
    adv = prism_advantages(t([5.0, NAN]), t([1.0, NAN]), t([1.0, 0.0]), [0, 0])
    assert_close(adv, t([0.7071058, -0.7071058 - 1.5]))


def test_single_response_groups_use_mean_zero_std_one():
    # valid: 0.5 * 2/(1+eps) + 0.5 * (-4)/(1+eps) = -1/(1+1e-6) = -0.999999
    # invalid alone: no valid score in its group -> scores 0 -> A = -1.5
    adv = prism_advantages(t([2.0, NAN]), t([-4.0, NAN]), [True, False], [0, 1])
    assert_close(adv, t([-0.999999, -1.5]))


def test_all_invalid_group_gets_only_the_format_penalty():
    adv = prism_advantages(t([NAN, 3.0, -2.0]), t([1.0, NAN, 7.0]), [False, False, False], [8, 8, 8])
    assert_close(adv, t([-1.5, -1.5, -1.5]))


def test_identical_scores_give_zero_not_rounding_noise():
    # 0.3 three times: a float32 mean may be off by one ulp; (x - mean) / (0 + 1e-6) must still be 0
    adv = prism_advantages(t([0.3, 0.3, 0.3]), t([0.7, 0.7, 0.7]), [True] * 3, [1, 1, 1])
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_interleaved_groups_in_one_batch_and_dtypes():
    # group 10 = the invalid-handling example, group 7 = a single valid response, group 2 all invalid
    caption = torch.tensor([1.0, 2.0, 2.0, NAN, NAN, NAN], dtype=torch.bfloat16)
    think = torch.tensor([4.0, -4.0, 3.0, NAN, 100.0, NAN], dtype=torch.bfloat16)
    ok = torch.tensor([True, True, True, False, False, False])
    groups = torch.tensor([10, 7, 10, 10, 2, 2])
    adv = prism_advantages(caption, think, ok, groups)
    assert adv.dtype == torch.float32 and adv.device == caption.device
    # [10]: 0.4999995, 0.4999995, -2.499999; [7]: 0.5*2 + 0.5*(-4) = -0.999999; [2]: -1.5, -1.5
    assert_close(adv, t([0.4999995, -0.999999, 0.4999995, -2.499999, -1.5, -1.5]))


def test_matches_a_per_group_reference_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    n = 64
    caption, think = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    ok = torch.rand(n, generator=gen) > 0.3
    groups = torch.randint(0, 12, (n,), generator=gen)
    adv = prism_advantages(caption, think, ok, groups, alpha=0.3, format_penalty=1.5)

    expected = torch.empty(n)
    for g in groups.unique():  # straightforward reference, one group at a time
        idx = (groups == g).nonzero().flatten()
        valid = ok[idx]
        gns = []
        for scores in (caption[idx].double(), think[idx].double()):
            if valid.any():
                scores = torch.where(valid, scores, scores[valid].min() - 1)
            else:
                scores = torch.zeros_like(scores)
            if len(idx) == 1:
                gns.append(scores / (1 + EPS))
            else:
                gns.append((scores - scores.mean()) / (scores.std() + EPS))
        expected[idx] = (0.3 * gns[0] + 0.7 * gns[1] - 1.5 * (~valid).double()).float()
    assert_close(adv, expected)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="think_scores"):
        prism_advantages(t([1.0, 2.0]), t([1.0]), [True, True], [0, 0])
    with pytest.raises(ValueError, match="group_ids"):
        prism_advantages(t([1.0, 2.0]), t([1.0, 2.0]), [True, True], [0])


def test_acc_gated_keeps_correct_and_caps_incorrect_at_zero():
    adv = t([1.0, -0.5, 0.8, -0.3, 0.0])
    acc = t([1.0, 1.0, 0.0, 0.0, 0.0])
    # correct: unchanged; incorrect: min(A, 0) -> 0.8 becomes 0, -0.3 stays
    assert_close(acc_gated_advantages(adv, acc), t([1.0, -0.5, 0.0, -0.3, 0.0]))


def test_rlvr_mixed_adds_group_normalised_reward():
    adv = t([0.5, -0.5, 0.2, 1.0, 0.1])
    scores = t([1.0, 0.2, 0.2, 0.2, 0.8])
    groups = [0, 0, 1, 1, 2]
    # group 0: [1.0, 0.2] mean 0.6, std sqrt(0.32) = 0.5656854; 0.4 / 0.5656864 = 0.7071055
    # group 1: identical -> 0; group 2: single -> 0.8 / (1 + 1e-6) = 0.7999992
    expected = t([0.5 + 0.7071055, -0.5 - 0.7071055, 0.2, 1.0, 0.1 + 0.7999992])
    assert_close(rlvr_mixed_advantages(adv, scores, groups), expected)


def test_bradley_terry_loss_values_mask_and_gradient():
    teacher = t([2.0, 0.0, 1.0], grad=True)
    student = t([0.0, 0.0, 3.0])
    # -logsigmoid(d) = log(1 + e^-d): d=2 -> 0.1269280, d=0 -> 0.6931472, d=-2 -> 2.1269280; mean 0.9823344
    assert_close(bradley_terry_loss(teacher, student), torch.tensor(0.9823344))
    # mask out the third pair (its student score may even be NaN): (0.1269280 + 0.6931472) / 2
    masked = bradley_terry_loss(teacher, t([0.0, 0.0, NAN]), torch.tensor([True, True, False]))
    assert_close(masked, torch.tensor(0.4100376))
    masked.backward()
    # d/ds_t = -sigmoid(-d) / 2: d=2 -> -0.1192029/2 = -0.0596015; d=0 -> -0.25; masked pair 0
    assert_close(teacher.grad, t([-0.0596015, -0.25, 0.0]))


def test_bradley_terry_loss_with_no_pair_is_zero_and_differentiable():
    teacher = t([1.0, 2.0], grad=True)
    loss = bradley_terry_loss(teacher, t([0.0, 0.0]), torch.tensor([False, False]))
    assert loss.item() == 0.0
    loss.backward()
    assert teacher.grad.tolist() == [0.0, 0.0]


def test_score_l2_sums_mean_squares():
    # mean([1, 1, 9]) = 11/3 = 3.6666667; mean([4]) = 4; empty set adds 0 -> 7.6666667
    out = score_l2(t([1.0, -1.0, 3.0]), t([2.0]), t([]))
    assert_close(out, torch.tensor(7.6666667))
    with pytest.raises(ValueError):
        score_l2()
