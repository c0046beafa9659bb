"""How a step's groups (one prompt, n rollouts) are spread over the processes.

A step holds `prompts` groups of `rollouts` responses each. When the processes divide the prompts, each
process owns whole groups. When there are more processes than prompts (the paper's align step is 4 prompts
x 16 rollouts on 8 or more GPUs), each group is split over `ranks_per_group` consecutive processes, each
generating an equal slice of its rollouts; whatever needs the whole group (the group-normalised advantages)
gathers it first. Anything else cannot be spread evenly and is refused before a launch does any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.errors import UsageError


@dataclass(frozen=True)
class GroupLayout:
    prompts: int            # groups per step, over all processes
    rollouts: int           # responses per group
    world: int
    ranks_per_group: int    # 1: whole groups per process

    @property
    def prompts_per_rank(self) -> int:
        return max(1, self.prompts // self.world)

    @property
    def rollouts_per_rank(self) -> int:
        return self.rollouts // self.ranks_per_group

    def prompt_indices(self, rank: int) -> range:
        """Which of the step's prompts (0 .. prompts-1) process `rank` rolls out."""
        if self.ranks_per_group == 1:
            return range(rank * self.prompts_per_rank, (rank + 1) * self.prompts_per_rank)
        group = rank // self.ranks_per_group
        return range(group, group + 1)


def group_layout(prompts: int, rollouts: int, world: int) -> GroupLayout:
    """The layout of `prompts` groups of `rollouts` over `world` processes, or a UsageError naming why not."""
    if prompts % world == 0:
        return GroupLayout(prompts, rollouts, world, 1)
    if world % prompts == 0:
        split = world // prompts
        if rollouts % split == 0:
            return GroupLayout(prompts, rollouts, world, split)
        raise UsageError(f"prompts_per_step {prompts} x rollouts_per_prompt {rollouts} cannot be spread evenly "
                         f"over {world} processes: each group would be split over {split} processes, which do "
                         f"not divide its {rollouts} rollouts",
                         hint=f"use a rollouts_per_prompt divisible by {split}, or a prompts_per_step divisible "
                              f"by {world}")
    raise UsageError(f"prompts_per_step {prompts} cannot be spread evenly over {world} processes: it neither "
                     f"divides by {world} nor divides {world}",
                     hint=f"use a multiple of {world}, or a divisor of {world} whose split divides the rollouts")
