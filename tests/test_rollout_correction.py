"""Rollout-vs-trainer correction on hand-made tensors: the logprob gap and truncated importance weights."""

import math

import pytest
import torch

from stages.common.rollout.correction import logprob_gap, truncated_is_weights

ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
TRAINER = torch.tensor([[-1.2, -1.0, -0.5], [-0.1, -3.5, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_gap_over_masked_tokens():
    gap = logprob_gap(ROLLOUT, TRAINER, MASK)
    diffs = [-0.2, 1.0, 0.0, 0.0, -0.5]            # trainer - rollout on the five valid tokens
    assert gap["gap_mean_abs"] == pytest.approx(sum(abs(d) for d in diffs) / 5)
    assert gap["gap_max_abs"] == pytest.approx(1.0)
    assert gap["gap_k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in diffs) / 5)
    assert logprob_gap(ROLLOUT, ROLLOUT, MASK) == {"gap_mean_abs": 0.0, "gap_max_abs": 0.0, "gap_k3": 0.0}
    assert logprob_gap(ROLLOUT, TRAINER, torch.zeros_like(MASK))["gap_mean_abs"] == 0.0


def test_truncated_weights():
    w = truncated_is_weights(TRAINER, ROLLOUT, MASK, cap=2.0)
    want = torch.tensor([[math.exp(-0.2), 2.0, 1.0], [1.0, math.exp(-0.5), 0.0]])   # exp(1.0) capped at 2
    assert torch.allclose(w, want, atol=1e-6)
    trainer = TRAINER.clone().requires_grad_(True)
    assert not truncated_is_weights(trainer, ROLLOUT, MASK, 2.0).requires_grad
    with pytest.raises(ValueError):
        truncated_is_weights(TRAINER, ROLLOUT, MASK, 0.0)


def test_weighted_advantages_scale_the_clipped_surrogate():
    """[B, T] advantages = A x w give the PPO-clip loss of each token scaled by w (w >= 0)."""
    from stages.common.policy_update.losses import ppo_clip_loss

    logp = torch.tensor([[-0.9, -1.1, -0.4]])
    old = torch.tensor([[-1.0, -1.0, -0.5]])
    mask = torch.ones(1, 3)
    w = torch.tensor([[0.5, 2.0, 1.0]])
    adv = torch.tensor([1.5])
    weighted, _ = ppo_clip_loss(logp, old, adv[:, None] * w, mask, agg="token-mean")
    per_token = [ppo_clip_loss(logp[:, i:i + 1], old[:, i:i + 1], adv, mask[:, i:i + 1])[0] for i in range(3)]
    assert weighted == pytest.approx(sum(float(w[0, i]) * float(per_token[i]) for i in range(3)) / 3, rel=1e-5)


def test_rl_records_the_gap_every_step_and_applies_tis(tmp_path):
    """The hf engine's logprobs are the trainer's (to float error): the recorded gap is ~0 and the truncated
    importance weights ~1, on every step."""
    import json

    from stages.rl.config import RLConfig
    from stages.rl.run import run
    from tests.conftest import run_stage

    out = run_stage(RLConfig, run, algo="grpo", ckpt="tiny", data=["synth:train:16"], out=str(tmp_path / "tis"),
                    steps=2, prompts_per_step=2, rollouts_per_prompt=4, max_new_tokens=16, lr=1e-3, warmup=1,
                    tis_cap=2.0, engine="hf", seed=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert 0 <= r["rollout/gap_mean_abs"] < 1e-3 and r["rollout/gap_k3"] < 1e-5
        assert r["update/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
