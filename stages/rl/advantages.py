"""Kept so `stages.rl.advantages` imports keep working: the advantages live in stages.common.advantages (align
uses them too)."""

from stages.common.advantages import (DynamicSamplingKeep, GroupIds, dynamic_sampling_keep,  # noqa: F401
                                      group_index, group_normalized_advantages, overlong_penalty)
