"""The RL algorithms `prism rl --algo` knows, one row each: the policy loss, the advantage and the defaults of
the knobs a user does not set. Adding one: its loss in stages.common.policy_update.losses (if new), a row here, a test
(docs/extending.md).

Rows name their loss and advantage (functions of stages.common.policy_update.losses / stages.common.policy_update.advantages) instead of
holding them, so this table imports no torch: RLConfig reads it, and the CLI imports every stage's config to
build its options. stages.rl.run looks them up; tests/test_registries.py checks every name."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.registry import Registry


@dataclass(frozen=True)
class Algorithm:
    about: str
    loss: str                 # in stages.common.policy_update.losses: (logp, old_logp, advantages, mask, *, clip_low, clip_high,
                              #   agg, normalizer) -> (loss, stats)
    advantage: str            # in stages.common.policy_update.advantages: (rewards, group_ids, normalize_std) -> [N]
    clip_low: float
    clip_high: float
    loss_agg: str
    dynamic_sampling: bool    # drop groups whose accuracy is all equal (DAPO)
    overlong_buffer: int      # DAPO's soft length penalty window in tokens (0: off)
    token_ratio: bool = True  # the importance ratio is per token (--tis-cap weights tokens); GSPO's is per sequence

    def default(self, knob: str):
        return getattr(self, knob)


ALGORITHMS: Registry[Algorithm] = Registry("RL algorithm", "--algo")

ALGORITHMS.register("grpo", Algorithm(
    "group-normalised advantage, PPO-clip", "ppo_clip_loss", "group_normalized_advantages",
    clip_low=0.2, clip_high=0.2, loss_agg="token-mean", dynamic_sampling=False, overlong_buffer=0))
ALGORITHMS.register("dapo", Algorithm(
    "clip-higher, dynamic sampling, overlong shaping", "ppo_clip_loss", "group_normalized_advantages",
    clip_low=0.2, clip_high=0.28, loss_agg="token-mean", dynamic_sampling=True, overlong_buffer=4096))
ALGORITHMS.register("gspo", Algorithm(
    "sequence-level importance ratio", "gspo_loss", "group_normalized_advantages",
    clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean", dynamic_sampling=False, overlong_buffer=0,
    token_ratio=False))
