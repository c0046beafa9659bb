"""The discriminator's objective, written once for the warmup and the game (REFERENCE: PRISM method):

    BT(caption) + BT(think)                     -log sigmoid(s_teacher - s_student), mean over the
                                                format-valid student responses, each against its
                                                prompt's teacher segment
    + score_reg * L2 on the four score sets     teacher caption, teacher think, and the format-valid
                                                student captions and thinks (mean of squares each)
    + aux_coef * router aux loss                the MoE load-balancing loss; the coefficient is the
                                                discriminator's own (config router_aux_loss_coef: 0.01
                                                upcycled, 0 dense), never a second copy of it

Scores are clipped to [-clip, clip] before all of it. A warmup pair is one group of one response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stages.align.advantage import bradley_terry_loss, score_l2

if TYPE_CHECKING:
    from stages.common.training.runtime import Processes


@dataclass
class GroupScores:
    """Discriminator scores for G prompt groups of n responses each (with grad to the discriminator)."""

    teacher_caption: torch.Tensor   # [G]
    teacher_think: torch.Tensor     # [G]
    student_caption: torch.Tensor   # [G, n]
    student_think: torch.Tensor     # [G, n]
    format_ok: torch.Tensor         # bool [G, n]: which student responses count
    aux_loss: torch.Tensor | None = None
    tokens: int = 0

    def detached(self) -> "GroupScores":
        d = lambda t: t.detach().float().cpu()  # noqa: E731
        return GroupScores(d(self.teacher_caption), d(self.teacher_think), d(self.student_caption),
                           d(self.student_think), self.format_ok.cpu(), None, self.tokens)


@dataclass
class ObjectiveTerms:
    loss: torch.Tensor
    bt_caption: float
    bt_think: float
    l2: float
    aux_loss: float
    acc_caption: float     # fraction of counted pairs the discriminator orders right (teacher above)
    acc_think: float
    valid_pairs: int
    loss_value: float      # the loss as a float: under several processes the global mean, not this process's share

    def metrics(self, prefix: str) -> dict:
        return {f"{prefix}loss": self.loss_value, f"{prefix}bt_caption": self.bt_caption,
                f"{prefix}bt_think": self.bt_think, f"{prefix}l2": self.l2, f"{prefix}aux_loss": self.aux_loss,
                f"{prefix}acc_caption": self.acc_caption, f"{prefix}acc_think": self.acc_think,
                f"{prefix}valid_pairs": self.valid_pairs}


def discriminator_objective(scores: GroupScores, *, score_reg: float, clip: float, aux_coef: float,
                            across: Processes | None = None) -> ObjectiveTerms:
    """The loss on this process's groups, and its terms as floats. Under several processes (`across`,
    training.processes) every mean divides by the global count's share per process instead of the local count
    (valid pairs and groups differ between processes: an early policy's format errors fall unevenly), so that
    the backend's gradient average over processes is the gradient of the mean over every process's pairs, as
    one process holding all of them computes it; the returned floats are then those global means too. The
    router aux loss stays a per-process statistic (docs/distributed.md)."""
    valid = scores.format_ok.to(scores.student_caption.device)
    tc, tt = scores.teacher_caption.clamp(-clip, clip), scores.teacher_think.clamp(-clip, clip)
    sc, st = scores.student_caption.clamp(-clip, clip), scores.student_think.clamp(-clip, clip)
    tc_pairs, tt_pairs = tc[:, None].expand_as(sc), tt[:, None].expand_as(st)
    n_valid = int(valid.sum())
    if across is None:
        bt_caption = bradley_terry_loss(tc_pairs, sc, valid)
        bt_think = bradley_terry_loss(tt_pairs, st, valid)
        l2 = score_l2(tc, tt, sc[valid], st[valid])
    else:
        all_valid, all_groups = across.sums([n_valid, valid.shape[0]])
        per_valid, per_group = all_valid / across.count, all_groups / across.count
        bt_caption = bradley_terry_loss(tc_pairs, sc, valid, denominator=per_valid)
        bt_think = bradley_terry_loss(tt_pairs, st, valid, denominator=per_valid)
        l2 = score_l2(tc, tt, sc[valid], st[valid], denominators=(per_group, per_group, per_valid, per_valid))
    loss = bt_caption + bt_think + score_reg * l2
    aux = scores.aux_loss
    if aux is not None and aux_coef:
        loss = loss + aux_coef * aux
    with torch.no_grad():
        right_c, right_t = float(((tc_pairs > sc) & valid).sum()), float(((tt_pairs > st) & valid).sum())
        values = [float(loss.detach()), float(bt_caption.detach()), float(bt_think.detach()), float(l2.detach()),
                  float(aux.detach()) if aux is not None else 0.0]
    if across is not None:   # each process's term is its share: the global value is their sum over processes
        *shares, right_c, right_t, n_valid = across.sums(values + [right_c, right_t, n_valid])
        values = [v / across.count for v in shares]
    loss_value, bt_c, bt_t, l2_value, aux_value = values
    return ObjectiveTerms(loss, bt_c, bt_t, l2_value, aux_value, right_c / max(n_valid, 1),
                          right_t / max(n_valid, 1), int(n_valid), loss_value)
