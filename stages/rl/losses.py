"""Kept so `stages.rl.losses` imports keep working: the losses live in stages.common.losses (align uses them
too)."""

from stages.common.losses import (AGGREGATION_MODES, aggregate, aggregation_normalizer, gspo_loss,  # noqa: F401
                                  kl_penalty, ppo_clip_loss)
