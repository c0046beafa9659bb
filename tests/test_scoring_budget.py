"""Scoring under a token budget: rows and chunks bounded by it, same scores and same gradients as one
forward over the whole group, and a backward that re-runs chunk by chunk."""

import pytest
import torch

from stages.align.scoring import _chunk_rows, _Row, score_groups
from stages.common.models.discriminator import upcycle
from stages.common.models.loading import load_processor
from tests.test_scoring import SEGMENTS, _prompt


@pytest.fixture(scope="module")
def processor():
    return load_processor("tiny")


@pytest.fixture(scope="module")
def disc():
    return upcycle("tiny", seed=1, value_head_std=0.1)


def _rows(lengths):
    return [_Row(prompt=None, group=0, segments=[i], length=n) for i, n in enumerate(lengths)]


def test_chunks_stay_within_the_budget():
    rows = _rows([30, 50, 20, 90, 10, 10, 10])
    chunks = _chunk_rows(rows, 100)
    assert [r for c in chunks for r in c] == list(range(7))          # every row once, in order
    for c in chunks:
        assert len(c) == 1 or len(c) * max(rows[r].length for r in c) <= 100
    assert _chunk_rows(rows, None) == [list(range(7))]
    assert _chunk_rows(_rows([150]), 100) == [[0]]                  # an over-wide row is its own chunk


def _groups():
    return [_prompt(seed=0), _prompt("What colour is the square?", seed=1)], [SEGMENTS, SEGMENTS[::-1] + ["ok"]]


def _grads(disc):
    return {n: p.grad.detach().clone() for n, p in disc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["shared", "prefix"])
def test_budget_gives_the_same_scores_and_gradients(disc, processor, layout):
    prompts, segments = _groups()
    weights = torch.linspace(-1, 1, sum(len(s) for s in segments))

    def run(budget):
        disc.zero_grad(set_to_none=True)
        result = score_groups(disc, processor, prompts, segments, layout, max_row_tokens=budget)
        flat = torch.cat(result.scores)
        result.backward((flat * weights).sum())
        return flat.detach(), _grads(disc), result

    whole, g_whole, r_whole = run(None)
    chunked, g_chunked, r_chunked = run(120)
    assert r_chunked.num_rows > r_whole.num_rows == 2              # the budget split the groups
    assert r_chunked.num_chunks > 1 == r_whole.num_chunks          # ... into chunks, re-run in backward
    assert r_chunked.num_tokens > r_whole.num_tokens                # each row repeats its prompt
    assert (whole - chunked).abs().max() < 1e-4
    assert g_whole.keys() == g_chunked.keys() and g_whole
    for name in g_whole:
        assert torch.allclose(g_whole[name], g_chunked[name], atol=1e-5, rtol=1e-4), name


def test_budget_backward_reruns_one_chunk_at_a_time(disc, processor):
    prompts, segments = _groups()
    calls = []
    hook = disc.value_head.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), o.shape[0])))
    try:
        result = score_groups(disc, processor, prompts, segments, "shared", max_row_tokens=120,
                              output_router_logits=True)
        n_chunks = len(calls)
        assert n_chunks > 1 and not any(grad for grad, _ in calls)   # forward: no graph kept
        loss = torch.cat(result.scores).sum() + 0.01 * result.aux_loss
        result.backward(loss)
    finally:
        hook.remove()
    assert len(calls) == 2 * n_chunks and all(grad for grad, _ in calls[n_chunks:])
    assert result.aux_loss is not None and result.aux_loss.requires_grad
    assert any(p.grad is not None and "mlp.gate" in n for n, p in disc.named_parameters())   # router got grads


class _Micro:
    """What ScoreResult.backward needs of a trained model (stages.common.training.distributed.Trained), recording
    each backward and whether it was the accumulation boundary."""

    def __init__(self):
        self.calls, self._last = [], None

    def accumulate(self, last):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            self._last = last
            yield
        return ctx()

    def backward(self, loss):
        self.calls.append(self._last)
        loss.backward()


def test_chunked_backward_is_one_top_level_backward_per_chunk_padded_to_the_global_count(disc, processor):
    """Each chunk is its own backward (gradient sync on the last only; before: one nested backward per chunk
    inside the loss's backward, which DDP/ZeRO reduce twice), and a process with fewer chunks than another
    runs repeats of weight 0: same gradients, as many forwards and backwards as the global count."""
    prompts, segments = _groups()
    weights = torch.linspace(-1, 1, sum(len(s) for s in segments))
    forwards = []
    hook = disc.value_head.register_forward_hook(lambda m, i, o: forwards.append(torch.is_grad_enabled()))
    try:
        disc.zero_grad(set_to_none=True)
        alone = score_groups(disc, processor, prompts, segments, "shared", max_row_tokens=120)
        alone.backward((torch.cat(alone.scores) * weights).sum())
        g_alone, n = _grads(disc), len(forwards) // 2
        forwards.clear()
        disc.zero_grad(set_to_none=True)
        micro = _Micro()
        padded = score_groups(disc, processor, prompts, segments, "shared", max_row_tokens=120,
                              global_chunks=lambda local: local + 2)
        padded.backward((torch.cat(padded.scores) * weights).sum(), micro)
    finally:
        hook.remove()
    assert n > 1 and forwards == [False] * (n + 2) + [True] * (n + 2)
    assert micro.calls == [False] * (n + 1) + [True]
    g_padded = _grads(disc)
    assert g_padded.keys() == g_alone.keys()
    for name in g_alone:
        assert torch.allclose(g_alone[name], g_padded[name], atol=1e-6, rtol=1e-5), name


def test_chunked_scores_refuse_a_plain_backward(disc, processor):
    """A plain loss.backward() would reach no parameter (the chunks ran without a graph): it raises."""
    prompts, segments = _groups()
    result = score_groups(disc, processor, prompts, segments, "shared", max_row_tokens=120)
    with pytest.raises(RuntimeError, match=r"ScoreResult.backward"):
        torch.cat(result.scores).sum().backward()


def test_one_chunk_everywhere_keeps_the_graph_and_backpropagates_once(disc, processor):
    prompts, segments = _groups()
    micro = _Micro()
    disc.zero_grad(set_to_none=True)
    result = score_groups(disc, processor, prompts, segments, "shared", global_chunks=lambda local: local)
    assert result.replay is None
    result.backward(torch.cat(result.scores).sum(), micro)
    assert micro.calls == [True] and _grads(disc)
