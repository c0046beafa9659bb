"""The vllm rollout engine: one vLLM LLM per training process, colocated on that process's GPU.

Placement: under torchrun / accelerate (WORLD_SIZE > 1) the engine is built with
distributed_executor_backend="external_launcher", which runs vLLM's worker inside this process on
cuda:LOCAL_RANK (the default uniprocess executor would put every rank's engine on cuda:0). Each rank is
its own data-parallel engine (tensor_parallel_size 1): engine seed base_seed + rank, and per-request seeds
spaced so that no two (rank, prompt, sample) streams coincide (`request_seeds`).

Lifecycle (the engine drives it; stages only call sync_weights and generate):
  sync_weights(model)  wake the weights only (wake_up(tags=["weights"])), load the trainer's current
                       weights through vLLM's own model.load_weights (LLM.apply_model where it exists),
                       reset the prefix cache, remember to probe;
  generate(...)        wake the KV cache (wake_up(tags=["kv_cache"])); after a sync, score a fixed probe
                       with prompt_logprobs and compare with the trainer's logprobs of the same tokens
                       (`probe_gap`): a gap above probe_tolerance means stale or mis-mapped weights and is an
                       error; then sample, and sleep again (level 1: weights to CPU, KV cache freed) so the
                       update gets the memory back. `last_probe_gap` is logged by the stages every step.
max_model_len comes from the stage (prompt budget + max_new_tokens), not a constant.

Sampling matches the hf engine: the chat-templated prompt text plus PIL images, n samples per request,
the vision special tokens banned (logit bias -100), stop strings kept in the output, logprobs of the
sampled tokens after temperature (logprobs_mode="processed_logprobs").

Verified here (unit tests, no vLLM, no GPU): request building, SamplingParams keywords, seeds, weight
names, output conversion, and the whole lifecycle against a fake LLM speaking vLLM 0.33's method
signatures (LLM(**kwargs), generate(prompts, sampling_params, use_tqdm), sleep(level), wake_up(tags),
apply_model(func), reset_prefix_cache()). NOT verified on GPU: the real vLLM engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from prism_cli.errors import PrismError
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
                  dtype: str, enforce_eager: bool, seed: int, rank: int, world_size: int) -> dict:
    """Keyword arguments of vllm.LLM for this process's engine (one per rank, on its own GPU)."""
    kwargs = dict(model=str(path), enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization,
                  max_model_len=int(max_model_len), limit_mm_per_prompt={"image": max_images_per_prompt},
                  tensor_parallel_size=1, enforce_eager=enforce_eager, dtype=dtype,
                  logprobs_mode="processed_logprobs", seed=int(seed) + rank)
    if world_size > 1:
        # runs the worker in this process on cuda:LOCAL_RANK (what torchrun/accelerate started)
        kwargs["distributed_executor_backend"] = "external_launcher"
    return kwargs


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


def weights_to_load(named_tensors, tie_word_embeddings: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf name, tensor) pairs for vLLM's load_weights: wrapper prefixes stripped, a tied lm_head skipped
    (vLLM ties it to the embedding itself)."""
    seen = set()
    for name, tensor in named_tensors:
        name = hf_weight_name(name)
        if tie_word_embeddings and name.endswith("lm_head.weight"):
            continue
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
    params = dict(model.named_parameters())
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


# ---- the engine (needs vLLM and a GPU) ------------------------------------------------------------------

class VLLMEngine:
    name = "vllm"

    def __init__(self, model, processor, *, model_path: str | None = None, gpu_memory_utilization: float = 0.4,
                 max_model_len: int = 8192, max_images_per_prompt: int = 4, sleep_level: int = 1,
                 enforce_eager: bool = False, dtype: str = "auto", seed: int = 0, sleep_between: bool = True,
                 probe_tolerance: float = 0.1, llm_factory=None, sampling_params_cls=None):
        # The model must live in this process for load_weights to reach it.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if llm_factory is None:
            from vllm import LLM as llm_factory
        if sampling_params_cls is None:
            from vllm import SamplingParams as sampling_params_cls
        self.sampling_params_cls = sampling_params_cls
        self.processor = processor
        self.banned_ids = vision_token_ids(processor)
        self.sleep_level, self.sleep_between, self.probe_tolerance = sleep_level, sleep_between, probe_tolerance
        self.rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.tie_word_embeddings = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        path = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path:
            raise PrismError("the vllm engine needs the policy's checkpoint directory (model_path)")
        self.llm = llm_factory(**engine_kwargs(path, max_model_len=max_model_len,
                                               gpu_memory_utilization=gpu_memory_utilization,
                                               max_images_per_prompt=max_images_per_prompt, dtype=dtype,
                                               enforce_eager=enforce_eager, seed=seed, rank=self.rank,
                                               world_size=world))
        self.probe_ids = processor.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        self.awake = {"weights": True, "kv_cache": True}
        self._probe_model = None     # the trainer model to compare with after the next wake
        self.last_probe_gap: float | None = None

    def generate(self, prompts: list[RolloutPrompt], params: SamplingParams) -> list[list[Completion]]:
        self._wake(("weights", "kv_cache"))
        if self._probe_model is not None:
            self.check_probe(self._probe_model)
            self._probe_model = None
        requests = [build_request(self.processor, p) for p in prompts]
        seeds = (request_seeds(params.seed, self.rank, len(prompts), params.n) if params.seed is not None
                 else [None] * len(prompts))
        per_request = [self.sampling_params_cls(**sampling_kwargs(params, self.banned_ids, s)) for s in seeds]
        outputs = self.llm.generate(requests, per_request, use_tqdm=False)
        if self.sleep_between:
            self.sleep()
        return [[completion_from_output(o) for o in out.outputs] for out in outputs]

    def sync_weights(self, model) -> None:
        """Load `model`'s current weights into vLLM (every rank gathers; vLLM's loader shards them again).
        Only the weights are woken for it: the KV cache is allocated when generate needs it."""
        self._wake(("weights",))
        unwrapped = getattr(model, "module", model)
        weights = list(weights_to_load(full_parameters(unwrapped), self.tie_word_embeddings))
        load = lambda vllm_model: vllm_model.load_weights(weights)  # noqa: E731
        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(load)      # the public path: runs on the (in-process) worker's model
        else:
            load(self._vllm_model())
        # Cached prefixes were computed with the old weights.
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        self._probe_model = unwrapped

    def check_probe(self, model) -> float:
        """Engine vs trainer logprobs of the fixed probe; raises when they disagree beyond tolerance."""
        params = self.sampling_params_cls(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": list(self.probe_ids)}], [params], use_tqdm=False)[0]
        gap = probe_gap(prompt_logprobs_of(out, self.probe_ids), trainer_logprobs(model, self.probe_ids))
        self.last_probe_gap = gap
        if gap > self.probe_tolerance:
            from prism_cli.errors import PrismError

            raise PrismError(f"the vLLM engine's logprobs of the probe differ from the trainer's by {gap:.4f} on "
                             f"average (tolerance {self.probe_tolerance}) after wake-up and weight sync: its "
                             "weights are stale or mis-mapped", hint="run with --set engine=hf and report this")
        return gap

    def sleep(self) -> None:
        if any(self.awake.values()):
            self.llm.sleep(level=self.sleep_level)
            self.awake = {"weights": False, "kv_cache": False}

    def wake(self) -> None:
        self._wake(("weights", "kv_cache"))

    def _wake(self, tags) -> None:
        asleep = [t for t in tags if not self.awake[t]]
        if asleep:
            self.llm.wake_up(tags=asleep)
            for t in asleep:
                self.awake[t] = True

    def _vllm_model(self):
        """vLLM's torch model inside this process, for vLLM versions without LLM.apply_model."""
        executor = self.llm.llm_engine.model_executor
        candidates = ("driver_worker.worker.model_runner.model", "driver_worker.model_runner.model")
        for path in candidates:
            obj = executor
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is not None:
                return obj() if path.endswith("get_model") else obj

        raise PrismError("cannot reach vLLM's model to load weights into (unknown vLLM version layout)",
                         hint="set VLLM_ENABLE_V1_MULTIPROCESSING=0 or pin the vLLM version prism lists")
