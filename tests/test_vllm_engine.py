"""The vllm engine's lifecycle against a fake LLM that speaks vLLM 0.33's method signatures (vLLM itself
cannot be installed here): placement and seeds, sleep/wake around every rollout, weights woken alone for
the sync, the probe check after each wake + sync (stale weights are caught), max_model_len from the stage."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from prism_cli.errors import PrismError
from stages.common.rollout import SamplingParams, make_engine
from stages.common.rollout import vllm as V
from tests.test_rollout import two_prompts


@pytest.fixture(scope="module")
def policy(tiny_path):
    from stages.common.models import load_policy, load_processor

    return load_policy("tiny", train=False), load_processor("tiny")


class FakeVllmModel:
    """vLLM's model inside the worker: load_weights(iterable of (hf name, tensor))."""

    def __init__(self, hf_model):
        self.hf = hf_model

    def load_weights(self, weights):
        state = self.hf.state_dict()
        for name, tensor in weights:
            state[name].copy_(tensor)


class FakeLLM:
    """LLM(**kwargs), generate(prompts, sampling_params, use_tqdm), sleep(level), wake_up(tags),
    apply_model(func), reset_prefix_cache(): the calls the engine makes, with vLLM's preconditions."""

    instances = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.model = FakeVllmModel(copy.deepcopy(FakeLLM.source))
        self.awake = {"weights": True, "kv_cache": True}
        self.calls = []
        FakeLLM.instances.append(self)

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        self.awake = {"weights": False, "kv_cache": False}

    def wake_up(self, tags=None):
        tags = tags or ["weights", "kv_cache"]
        self.calls.append(("wake_up", tuple(tags)))
        for t in tags:
            self.awake[t] = True

    def apply_model(self, func):
        assert self.awake["weights"], "weights loaded into a sleeping engine are lost"
        self.calls.append(("apply_model",))
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert all(self.awake.values()), "generate on a sleeping engine"
        self.calls.append(("generate", len(prompts)))
        outs = []
        for prompt, params in zip(prompts, sampling_params):
            if "prompt_token_ids" in prompt:        # the probe: prompt_logprobs from the engine's own weights
                ids = prompt["prompt_token_ids"]
                lp = V.trainer_logprobs(self.model.hf, ids)
                entries = [None] + [{t: SimpleNamespace(logprob=v)} for t, v in zip(ids[1:], lp)]
                outs.append(SimpleNamespace(prompt_logprobs=entries, outputs=[]))
                continue
            children = [SimpleNamespace(token_ids=(5,), text="x", finish_reason="length",
                                        logprobs=[{5: SimpleNamespace(logprob=-1.0)}]) for _ in range(params.n)]
            outs.append(SimpleNamespace(outputs=children, seed=params.seed))
        return outs


class FakeSamplingParams(SimpleNamespace):
    def __init__(self, n=1, **kwargs):
        super().__init__(n=n, **kwargs)


def _engine(policy, monkeypatch, world=1, rank=0, **opts):
    model, processor = policy
    FakeLLM.source = model
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    return V.VLLMEngine(model, processor, model_path="unused", llm_factory=FakeLLM,
                        sampling_params_cls=FakeSamplingParams, **opts)


def test_request_seeds_never_overlap_across_prompts_samples_and_ranks():
    n = 16
    streams = set()
    for rank in range(8):
        for seed in V.request_seeds(7, rank, 4, n):
            streams.update(seed + j for j in range(n))       # vLLM's children: seed + sample index
    assert len(streams) == 8 * 4 * n
    assert V.request_seeds(7, 0, 4, n) == V.request_seeds(7, 0, 4, n)
    assert V.request_seeds(8, 0, 4, n) != V.request_seeds(7, 0, 4, n)


def test_engine_kwargs_place_one_engine_per_rank():
    one = V.engine_kwargs("m", max_model_len=10240, gpu_memory_utilization=0.4, max_images_per_prompt=4,
                          dtype="auto", enforce_eager=False, seed=3, rank=0, world_size=1)
    assert "distributed_executor_backend" not in one and one["max_model_len"] == 10240 and one["enable_sleep_mode"]
    many = V.engine_kwargs("m", max_model_len=8192, gpu_memory_utilization=0.4, max_images_per_prompt=4,
                           dtype="auto", enforce_eager=False, seed=3, rank=5, world_size=8)
    assert many["distributed_executor_backend"] == "external_launcher"
    assert many["seed"] == 8 and many["tensor_parallel_size"] == 1


def test_lifecycle_sleeps_after_rollouts_and_wakes_weights_alone_for_the_sync(policy, monkeypatch):
    model, _ = policy
    engine = _engine(policy, monkeypatch, world=8, rank=2, sleep_between=True)
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher" and llm.kwargs["seed"] == 2
    for step in range(2):
        engine.sync_weights(model)
        out = engine.generate(two_prompts(), SamplingParams(n=3, seed=11, max_new_tokens=4))
        assert len(out) == 2 and all(len(g) == 3 for g in out)
        assert engine.last_probe_gap is not None and engine.last_probe_gap < 1e-5
    names = [c[0] if c[0] != "wake_up" else f"wake_up{c[1]}" for c in llm.calls]
    assert names == ["apply_model", "reset_prefix_cache", "generate", "generate", "sleep",
                     "wake_up('weights',)", "apply_model", "reset_prefix_cache", "wake_up('kv_cache',)",
                     "generate", "generate", "sleep"]


def test_per_request_seeds_reach_vllm(policy, monkeypatch):
    engine = _engine(policy, monkeypatch, world=8, rank=3)
    llm = FakeLLM.instances[-1]
    seen = []
    real = llm.generate
    llm.generate = lambda prompts, params, use_tqdm=True: (seen.extend(p.seed for p in params), real(prompts, params))[1]
    engine.generate(two_prompts(), SamplingParams(n=4, seed=9, max_new_tokens=4))
    assert seen == V.request_seeds(9, 3, 2, 4)


def test_probe_catches_stale_weights(policy, monkeypatch):
    model, _ = policy
    engine = _engine(policy, monkeypatch)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    llm = FakeLLM.instances[-1]
    llm.apply_model = lambda func: None               # a sync that silently loads nothing
    engine.sync_weights(trained)
    with pytest.raises(PrismError, match="differ from the trainer"):
        engine.generate(two_prompts(), SamplingParams(n=1, max_new_tokens=4))


def test_probe_gap():
    assert V.probe_gap([-1.0, -2.0], [-1.5, -2.0]) == 0.25
    with pytest.raises(ValueError):
        V.probe_gap([-1.0], [])


def test_make_engine_passes_max_model_len_from_the_stage(policy, monkeypatch):
    import stages.common.rollout as rollout

    model, processor = policy
    got = {}
    # the engine table's row, as if this machine had vLLM and a GPU
    monkeypatch.setitem(rollout.ENGINES._entries, "vllm",
                        dataclasses.replace(rollout.ENGINES.get("vllm"), usable=lambda: True))
    monkeypatch.setattr(V, "VLLMEngine", lambda m, p, **kw: got.update(kw) or "engine")
    assert make_engine("vllm", model, processor, max_new_tokens=8192, seed=4, training=True) == "engine"
    assert got["max_model_len"] == rollout.MAX_PROMPT_TOKENS + 8192 and got["seed"] == 4 and got["sleep_between"]
