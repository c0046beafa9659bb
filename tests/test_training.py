"""Shared training pieces (stages.common.training)."""

import torch

from stages.common import training


def test_optimizer_is_fused_adamw_with_the_usual_decay_groups_and_same_update_as_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    reference = [p.detach().clone() for p in model.parameters()]
    opt = training.build_optimizer(model, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True
    decay, no_decay = opt.param_groups
    assert [p.ndim for p in decay["params"]] == [2, 2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0

    # the same three steps with torch's per-parameter loop implementation
    twin = [torch.nn.Parameter(p.clone()) for p in reference]
    by_id = {id(p): i for i, p in enumerate(model.parameters())}
    loop = torch.optim.AdamW([{"params": [twin[by_id[id(p)]] for p in g["params"]],
                               "weight_decay": g["weight_decay"]} for g in opt.param_groups],
                             lr=1e-2, foreach=False)
    x = torch.randn(16, 8)
    for _ in range(3):
        for o in (opt, loop):
            o.zero_grad()
        model(x).square().sum().backward()
        out = x
        for layer, (w, b) in zip((torch.nn.functional.linear, torch.nn.functional.layer_norm,
                                  torch.nn.functional.linear), zip(twin[::2], twin[1::2])):
            out = layer(out, (8,), w, b) if layer is torch.nn.functional.layer_norm else layer(out, w, b)
        out.square().sum().backward()
        opt.step()
        loop.step()
    for p, q, r in zip(model.parameters(), twin, reference):
        assert not torch.equal(p, r)                                  # it moved
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
