"""The vllm engine against a fake LLM that speaks vLLM 0.33's method signatures, for what vLLM's CPU build
cannot show (tests/test_vllm_real.py runs the real engine): the GPU lifecycle with sleep mode (cumem sleep/wake
around every rollout, weights woken alone for the sync, never generating partly awake), placement and seeds
across 8 ranks, the probe check after each wake + sync, max_model_len from the stage and its cap."""

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from stages.common.contract.errors import PrismError
from stages.common.rollout import SamplingParams, make_engine
from stages.common.rollout import vllm as V
from tests.test_rollout import two_prompts


@pytest.fixture(scope="module")
def policy(tiny_path):
    from stages.common.models.loading import load_policy, load_processor

    return load_policy("tiny", train=False), load_processor("tiny")


class FakeVllmModel:
    """vLLM's model inside the worker: load_weights(iterable of (hf name, tensor))."""

    def __init__(self, hf_model):
        self.hf = hf_model

    def load_weights(self, weights):
        state = self.hf.state_dict()
        loaded = set()
        for name, tensor in weights:
            state[name].copy_(tensor)
            loaded.add(name)
        return loaded


class FakeLLM:
    """LLM(**kwargs), generate(prompts, sampling_params, use_tqdm), sleep(level), wake_up(tags),
    collective_rpc("reload_weights", kwargs), reset_prefix_cache(): the calls the engine makes, with vLLM's
    preconditions (real vLLM hangs where this one asserts)."""

    instances = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.model = FakeVllmModel(copy.deepcopy(FakeLLM.source))
        self.awake = {"weights": True, "kv_cache": True}
        self.calls = []
        self.llm_engine = SimpleNamespace(reset_encoder_cache=lambda: self.calls.append(("reset_encoder_cache",)))
        FakeLLM.instances.append(self)

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        self.awake = {"weights": False, "kv_cache": False}

    def wake_up(self, tags=None):
        tags = tags or ["weights", "kv_cache"]
        self.calls.append(("wake_up", tuple(tags)))
        for t in tags:
            self.awake[t] = True

    def collective_rpc(self, method, kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        assert self.awake["weights"], "weights loaded into a sleeping engine are lost"
        self.calls.append(("reload_weights",))
        return [self.model.load_weights(kwargs["weights_iterator"])]

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
            outs.append(SimpleNamespace(outputs=children, seed=getattr(params, "seed", None)))
        return outs


class FakeSamplingParams(SimpleNamespace):
    def __init__(self, n=1, **kwargs):
        super().__init__(n=n, **kwargs)


def _engine(policy, monkeypatch, world=1, rank=0, **opts):
    model, processor = policy
    FakeLLM.source = model
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    opts.setdefault("sleep_mode", True)      # a GPU's platform
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
    assert names == ["reload_weights", "reset_prefix_cache", "reset_encoder_cache", "generate", "generate", "sleep",
                     "wake_up('weights',)", "reload_weights", "reset_prefix_cache", "reset_encoder_cache",
                     "wake_up('kv_cache',)", "generate", "generate", "sleep"]


def test_per_request_seeds_reach_vllm(policy, monkeypatch):
    engine = _engine(policy, monkeypatch, world=8, rank=3)
    engine.check_probe(policy[0])     # the first generate's probe (no seed), out of the way
    engine._probe_model = None
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
    llm.collective_rpc = lambda method, kwargs=None: None   # a sync that silently loads nothing
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


def test_no_sleep_mode_off_gpu_platforms(policy, monkeypatch):
    """vLLM raises on enable_sleep_mode where the platform lacks it (CPU): not asked for, never slept."""
    model, _ = policy
    kwargs = V.engine_kwargs("m", max_model_len=64, gpu_memory_utilization=0.4, max_images_per_prompt=1,
                             dtype="auto", enforce_eager=True, seed=0, rank=0, world_size=1, sleep_mode=False)
    assert kwargs["enable_sleep_mode"] is False
    engine = _engine(policy, monkeypatch, sleep_mode=False, sleep_between=True)
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["enable_sleep_mode"] is False
    engine.sync_weights(model)
    engine.generate(two_prompts(), SamplingParams(n=1, max_new_tokens=4))
    assert not [c for c in llm.calls if c[0] in ("sleep", "wake_up")]


def test_probe_right_after_a_sync_wakes_the_kv_cache_first(policy, monkeypatch):
    """After a sync only the weights are awake; real vLLM never schedules then (it hangs), so the probe wakes
    everything before generating."""
    model, _ = policy
    engine = _engine(policy, monkeypatch, sleep_between=True)
    engine.generate(two_prompts(), SamplingParams(n=1, max_new_tokens=4))     # ends asleep
    engine.sync_weights(model)
    assert engine.awake == {"weights": True, "kv_cache": False}
    assert engine.check_probe(model) < 1e-5
    engine.awake["kv_cache"] = False          # a state the engine never reaches: refused, not hung
    with pytest.raises(PrismError, match="kv_cache sleeps"):
        engine._generate([], [])


def test_engine_start_leaves_the_trainers_rng_alone(policy, monkeypatch):
    import random

    import numpy

    class ReseedingLLM(FakeLLM):     # what an in-process vLLM does at start-up: seed + rank everywhere
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            random.seed(kwargs["seed"])
            numpy.random.seed(kwargs["seed"])
            torch.manual_seed(kwargs["seed"])

    model, processor = policy
    FakeLLM.source = model
    torch.manual_seed(123)
    random.seed(123)
    numpy.random.seed(123)
    expected = (torch.rand(3), random.random(), numpy.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    numpy.random.seed(123)
    V.VLLMEngine(model, processor, model_path="unused", llm_factory=ReseedingLLM,
                 sampling_params_cls=FakeSamplingParams, sleep_mode=True, seed=5)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert numpy.random.rand() == expected[2]


def test_in_process_mode_is_forced_over_an_exported_one(monkeypatch, capsys):
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    V.force_in_process(env)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING=1 is ignored" in capsys.readouterr().err
    env = {}
    V.force_in_process(env)
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} and capsys.readouterr().err == ""


def test_max_model_len_is_capped_at_the_models_positions(policy, monkeypatch):
    model, _ = policy
    positions = V.model_positions(model)
    assert positions is not None
    _engine(policy, monkeypatch, max_model_len=positions + 2048)
    assert FakeLLM.instances[-1].kwargs["max_model_len"] == positions
    _engine(policy, monkeypatch, max_model_len=positions - 1)
    assert FakeLLM.instances[-1].kwargs["max_model_len"] == positions - 1


def test_a_prompt_that_cannot_fit_is_one_clear_error(policy, monkeypatch):
    engine = _engine(policy, monkeypatch, max_model_len=64)
    engine.generate(two_prompts(), SamplingParams(n=1, max_new_tokens=4))   # the first probe, out of the way

    class VLLMValidationError(Exception):     # vLLM's: not a ValueError
        pass

    def too_long(prompts, params, use_tqdm=True):
        raise VLLMValidationError("This model's maximum context length is 64 tokens. However, your prompt contains "
                                  "90 input tokens, which exceeds this limit even without any output tokens.")

    FakeLLM.instances[-1].generate = too_long
    with pytest.raises(PrismError, match="does not fit the vllm engine's context of 64 tokens"):
        engine.generate(two_prompts(), SamplingParams(n=1, max_new_tokens=4))


def test_a_tied_lm_head_is_sent_with_the_embedding(policy):
    model, _ = policy
    names = [n for n, _ in V.weights_to_load(V.full_parameters(model))]
    assert len(names) == len(set(names))
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" in names
