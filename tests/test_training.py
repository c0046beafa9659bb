"""Shared training pieces (stages.common.training.runtime)."""

import copy

import torch

from stages.common.training import runtime as training


def test_optimizer_is_fused_adamw_with_the_usual_decay_groups_and_same_update_as_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = training.build_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2, 2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0

    # torch's per-parameter loop implementation on a copy, with the same groups
    twin_of = dict(zip(map(id, model.parameters()), twin.parameters()))
    loop = torch.optim.AdamW([{"params": [twin_of[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                              for g in opt.param_groups], lr=1e-2, foreach=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, o in ((model, opt), (twin, loop)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q, p0 in zip(model.parameters(), twin.parameters(), start):
        assert not torch.equal(p, p0)                                 # it moved
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
