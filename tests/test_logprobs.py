"""Logprob recomputation: agreement with the hf engine, chunked == full (values and gradients), batching."""

import random

import pytest
import torch

from stages.common.policy_update.logprobs import (
    build_policy_batch,
    chunked_token_logprobs,
    full_logits_logprobs,
    make_microbatches,
    make_prefix_microbatches,
    response_logprobs,
    sampling_logprobs,
    select_rows,
    shared_prefix_supported,
)
from stages.common.rollout import RolloutPrompt, SamplingParams
from stages.common.rollout.hf import HFEngine
from tests.test_rollout import shape_image, two_prompts, with_logit_bias


@pytest.fixture(scope="module")
def policy(tiny_path):
    from stages.common.models.loading import load_policy, load_processor

    return load_policy(tiny_path, train=False), load_processor(tiny_path)


def mixed_prompts():
    """Two image prompts of different sizes and lengths, plus one text-only prompt."""
    return two_prompts() + [RolloutPrompt(messages=[{"role": "user", "content": "say something"}])]


def engine_logprobs(results, T):
    flat = [c for group in results for c in group]
    out = torch.zeros(len(flat), T)
    for i, c in enumerate(flat):
        out[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_recomputation(policy, temperature):
    """Engine: left-padded prefill, shared KV cache, early-finishing rows compacted away. Recompute:
    right-padded rows, positions from the full sequence. Same numbers within 1e-4 (fp32)."""
    model, processor = policy
    eos = processor.tokenizer.eos_token_id
    model = with_logit_bias(model, {eos: 4.0})      # some rows end early, so the batch gets compacted
    prompts, n = mixed_prompts(), 3
    res = HFEngine(model, processor).generate(prompts, SamplingParams(n=n, max_new_tokens=12, seed=2,
                                                                       temperature=temperature))
    responses = [c.token_ids for group in res for c in group]
    assert len({len(r) for r in responses}) > 1     # rows of different lengths
    batch = build_policy_batch(processor, prompts, responses, [p for p in range(len(prompts)) for _ in range(n)])
    with torch.no_grad():
        logp, _ = response_logprobs(model, batch, temperature=temperature, chunk_size=5)
    expected = engine_logprobs(res, logp.shape[1])
    assert torch.allclose(logp, expected, atol=1e-4), (logp - expected).abs().max()


def test_policy_batch_layout(policy):
    _, processor = policy
    prompts = two_prompts()
    batch = build_policy_batch(processor, prompts, [[5, 6, 7], [8], [9, 10]], [0, 1, 1])
    assert batch["response_mask"].tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert batch["response_ids"][0].tolist() == [5, 6, 7]
    p0 = int(batch["prompt_lengths"][0])
    assert batch["input_ids"][0, p0:p0 + 3].tolist() == [5, 6, 7]
    for row, start in enumerate(batch["prompt_lengths"].tolist()):  # generated tokens are text for M-RoPE
        assert batch["mm_token_type_ids"][row, start:].eq(0).all()
    assert int(batch["mm_token_type_ids"][0].sum()) == 16 and int(batch["mm_token_type_ids"][1].sum()) == 36
    assert batch["image_grid_thw"].shape[0] == 3                  # one image per row, in row order
    assert batch["pixel_values"].shape[0] == int(batch["pixel_counts"].sum())
    assert batch["attention_mask"].sum(1).tolist() == batch["lengths"].tolist()
    sub = select_rows(batch, [2])
    assert sub["input_ids"].shape[1] == int(batch["lengths"][2]) and sub["image_grid_thw"].shape[0] == 1


def test_microbatched_rows_give_the_same_logprobs(policy):
    model, processor = policy
    prompts = mixed_prompts()
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, 800, (int(k),), generator=g).tolist() for k in (3, 9, 1, 6, 4, 7)]
    batch = build_policy_batch(processor, prompts, responses, [0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        whole, _ = response_logprobs(model, batch)
        for rows in make_microbatches(batch["lengths"].tolist(), max_tokens=90):
            part, _ = response_logprobs(model, select_rows(batch, rows))
            assert torch.allclose(part, whole[rows][:, : part.shape[1]], atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 10_000])
def test_chunked_equals_full_logits(policy, chunk_size):
    model, processor = policy
    batch = build_policy_batch(processor, two_prompts(), [[11, 12, 13, 14], [15, 16]], [0, 1])
    with torch.no_grad():
        chunked, entropy = response_logprobs(model, batch, temperature=0.8, chunk_size=chunk_size, with_entropy=True)
        full = full_logits_logprobs(model, batch, temperature=0.8)
    assert torch.allclose(chunked, full, atol=1e-5)
    assert (entropy[batch["response_mask"]] > 0).all() and entropy[~batch["response_mask"]].eq(0).all()


def test_chunked_gradient_equals_full_gradient():
    """Values, entropy and gradients (hidden states and lm_head) of the checkpointed chunks == full logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    banned = torch.zeros(50, dtype=torch.bool)
    banned[[3, 7]] = True
    targets[targets == 3] = 4
    targets[targets == 7] = 8
    weights = torch.randn(23)

    logp, ent = chunked_token_logprobs(head, hidden, targets, 0.7, banned, chunk_size=4, with_entropy=True)
    (logp * weights).sum().add((ent * weights.flip(0)).sum()).backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None

    all_logp = sampling_logprobs(head(hidden), 0.7, banned)
    ref_logp = all_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = all_logp.exp()
    ref_ent = -(probs * all_logp.masked_fill(banned, 0.0)).sum(-1)
    (ref_logp * weights).sum().add((ref_ent * weights.flip(0)).sum()).backward()

    assert torch.allclose(logp, ref_logp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-5)
    assert torch.allclose(grads[1], head.weight.grad, atol=1e-5)
    assert torch.isfinite(grads[1]).all()


def test_chunk_count_can_be_raised_to_the_global_count_without_changing_anything():
    """ZeRO-3 gathers lm_head on every call, forward and (checkpoint) backward: a process with fewer tokens
    calls it as often as the busiest (n_chunks), with the same values and gradients as its own count."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    results = {}
    for n_chunks in (None, 5):
        calls.clear()
        hidden.grad, head.weight.grad = None, None
        logp, _ = chunked_token_logprobs(head, hidden, targets, 1.0, None, chunk_size=4, n_chunks=n_chunks)
        (logp * torch.linspace(-1, 1, 9)).sum().backward()
        results[n_chunks] = (logp.detach(), hidden.grad.clone(), head.weight.grad.clone(), list(calls))
    own, raised = results[None], results[5]
    assert len(own[3]) == 2 * 3                    # ceil(9 / 4) chunks, each recomputed once in backward
    assert len(raised[3]) == 2 * 5
    for a, b in zip(own[:3], raised[:3]):
        assert torch.equal(a, b)


def test_sft_nll_without_targets_still_calls_lm_head_as_often_as_the_other_processes(tiny_path):
    """A micro-batch with no target token (all prompt) skipped lm_head, while another rank called it."""
    from stages.common.models.loading import load_policy
    from stages.sft.data import IGNORE
    from stages.sft.loss import summed_nll

    model = load_policy(tiny_path, train=True)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(1))
    ids = torch.randint(10, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "targets": torch.full_like(ids, IGNORE)}
    nll, n = summed_nll(model, batch, chunk_size=4, global_chunks=lambda local: 3)
    nll.backward()
    assert n == 0 and float(nll.detach()) == 0.0 and len(calls) >= 3         # 3 forward calls (+ recomputes)
    calls.clear()
    assert summed_nll(model, batch, chunk_size=4, global_chunks=lambda local: local)[1] == 0 and calls == [1]


def test_model_gradient_chunked_equals_full(policy):
    model, processor = policy
    batch = build_policy_batch(processor, two_prompts(), [[21, 22, 23], [24, 25, 26, 27]], [0, 1])
    grads = []
    for path in ("chunked", "full"):
        model.zero_grad()
        if path == "chunked":
            logp, _ = response_logprobs(model, batch, chunk_size=2)
        else:
            logp = full_logits_logprobs(model, batch)
        logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_make_microbatches_respects_budget_and_covers_every_row():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(50, 1000)
        groups = make_microbatches(lengths, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) * max(lengths[i] for i in g) <= budget or len(g) == 1
    assert make_microbatches([10, 10, 10, 25], 30) == [[3], [0, 1, 2]]
    assert make_microbatches([], 10) == []
    with pytest.raises(ValueError):
        make_microbatches([1], 0)


def test_images_only_in_selected_rows(policy):
    _, processor = policy
    prompts = [RolloutPrompt(messages=[{"role": "user", "content": "text only"}]),
               RolloutPrompt(messages=[{"role": "user", "content": [{"type": "image"}]}], images=[shape_image("red")])]
    batch = build_policy_batch(processor, prompts, [[1], [2]], [0, 1])
    assert "pixel_values" not in select_rows(batch, [0])
    assert select_rows(batch, [1])["pixel_values"].shape[0] == int(batch["pixel_counts"][1])


def test_shared_prefix_equals_full_rows_values_and_gradients(tiny_path):
    """Each distinct prompt run once, responses on its KV cache: the same logprobs, entropies and parameter
    gradients (vision tower included) as running every row as prompt + response. Rows of the three prompts
    (two image sizes, one text-only) interleaved, one prompt unused in the sub-batch."""
    from stages.common.models.loading import load_policy, load_processor

    model, processor = load_policy(tiny_path, train=True), load_processor(tiny_path)
    responses = [[11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21, 22], [23], [24, 25, 26], [27, 28]]
    batch = build_policy_batch(processor, mixed_prompts(), responses, [0, 1, 1, 0, 2, 1])
    results = {}
    for sub in ([0, 1, 2, 3, 4, 5], [2, 3, 5]):
        for shared in (False, True):
            model.zero_grad()
            logp, entropy = response_logprobs(model, select_rows(batch, sub), temperature=0.8, chunk_size=3,
                                              with_entropy=True, shared_prefix=shared)
            (1.3 * logp.sum() + 0.7 * entropy.sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[tuple(sub), shared] = (logp.detach(), entropy.detach(), grads)
        (lf, ef, gf), (ls, es, gs) = results[tuple(sub), False], results[tuple(sub), True]
        torch.testing.assert_close(ls, lf, atol=1e-5, rtol=0)
        torch.testing.assert_close(es, ef, atol=1e-5, rtol=0)
        assert gs.keys() == gf.keys() and any("visual" in n for n in gf)
        for name in gf:
            torch.testing.assert_close(gs[name], gf[name], atol=1e-5, rtol=1e-4, msg=name)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not shared_prefix_supported(model)     # transformers drops the KV cache under checkpointing


def test_make_prefix_microbatches_groups_by_prompt_within_budget():
    rng = random.Random(0)
    for _ in range(50):
        rows = rng.randint(1, 40)
        prompt_index = sorted(rng.randrange(5) for _ in range(rows))
        prompt_len = {p: rng.randint(10, 200) for p in range(5)}
        plen = [prompt_len[p] for p in prompt_index]
        rlen = [rng.randint(1, 100) for _ in range(rows)]
        budget = rng.randint(100, 2000)
        groups = make_prefix_microbatches(prompt_index, plen, rlen, budget)
        assert sorted(i for g in groups for i in g) == list(range(rows))
        for g in groups:
            prompts = {prompt_index[i] for i in g}
            cost = len(prompts) * max(plen[i] for i in g) + len(g) * max(rlen[i] for i in g)
            assert cost <= budget or len(g) == 1
    # 2 prompts x 4 rows: one micro-batch runs both prompts once (2 x 100 + 8 x 10 = 280 tokens)
    assert make_prefix_microbatches([0] * 4 + [1] * 4, [100] * 8, [10] * 8, 300) == [list(range(8))]
    assert make_prefix_microbatches([0, 0, 1], [100] * 3, [10, 30, 20], 160) == [[1, 0], [2]]   # 100 + 2 x 30
