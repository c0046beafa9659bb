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

import torch

from stages.align.advantage import bradley_terry_loss, score_l2


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

    def metrics(self, prefix: str) -> dict:
        return {f"{prefix}loss": float(self.loss.detach()), f"{prefix}bt_caption": self.bt_caption,
                f"{prefix}bt_think": self.bt_think, f"{prefix}l2": self.l2, f"{prefix}aux_loss": self.aux_loss,
                f"{prefix}acc_caption": self.acc_caption, f"{prefix}acc_think": self.acc_think,
                f"{prefix}valid_pairs": self.valid_pairs}


def discriminator_objective(scores: GroupScores, *, score_reg: float, clip: float, aux_coef: float) -> ObjectiveTerms:
    valid = scores.format_ok.to(scores.student_caption.device)
    tc, tt = scores.teacher_caption.clamp(-clip, clip), scores.teacher_think.clamp(-clip, clip)
    sc, st = scores.student_caption.clamp(-clip, clip), scores.student_think.clamp(-clip, clip)
    tc_pairs, tt_pairs = tc[:, None].expand_as(sc), tt[:, None].expand_as(st)
    bt_caption = bradley_terry_loss(tc_pairs, sc, valid)
    bt_think = bradley_terry_loss(tt_pairs, st, valid)
    l2 = score_l2(tc, tt, sc[valid], st[valid])
    loss = bt_caption + bt_think + score_reg * l2
    aux = scores.aux_loss
    if aux is not None and aux_coef:
        loss = loss + aux_coef * aux
    with torch.no_grad():
        n_valid = int(valid.sum())
        acc_c = float(((tc_pairs > sc) & valid).sum()) / max(n_valid, 1)
        acc_t = float(((tt_pairs > st) & valid).sum()) / max(n_valid, 1)
    return ObjectiveTerms(loss, float(bt_caption.detach()), float(bt_think.detach()), float(l2.detach()),
                          float(aux.detach()) if aux is not None else 0.0, acc_c, acc_t, n_valid)
