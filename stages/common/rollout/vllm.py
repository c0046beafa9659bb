"""The vllm rollout engine: a vLLM LLM colocated with training in the same process and on the same GPU.

Lifecycle per RL step (the stage drives it): wake() -> sync_weights(policy) -> generate(...) -> sleep().
sleep() frees the KV cache and offloads weights (vLLM sleep mode, level 1 by default) so training gets the
GPU memory back; sync_weights() streams the training model's current parameters into vLLM's model with
its own `load_weights` (full tensors gathered from FSDP2 DTensors / DeepSpeed ZeRO-3 partitions first).

Sampling matches the hf engine: the chat-templated prompt text plus PIL images, n samples per request,
the vision special tokens banned (logit bias -100, which leaves the other tokens' softmax unchanged to
float precision), stop strings cut after the stop string (include_stop_str_in_output), logprobs of the
sampled tokens after temperature (logprobs_mode="processed_logprobs").

What is verified and what is not (vLLM cannot be installed on the machines this was written on):
- verified by unit tests on a CPU, without vLLM: request building (prompt text, image list), the
  SamplingParams keyword set, the weight-name mapping (wrapper prefixes stripped, tied lm_head skipped),
  the conversion of vLLM-shaped outputs into Completions;
- NOT verified: anything that imports vllm -- the LLM(...) constructor arguments, sleep/wake_up, the
  path to the executor's model for load_weights (tried in order below, across vLLM versions), and the
  exact logprob agreement with stages.common.logprobs. Two known convention differences: with top-k /
  top-p truncation on, vLLM's processed logprobs are over the truncated distribution (ours are not); the
  tied-embedding and name mapping relies on vLLM's own hf_to_vllm mapper accepting Hugging Face names.
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


def sampling_kwargs(params: SamplingParams, banned_ids: list[int], request_index: int = 0) -> dict:
    """Keyword arguments of vllm.SamplingParams for one request, mirroring the hf engine."""
    kwargs = dict(n=params.n, temperature=max(params.temperature, 0.0), top_p=params.top_p,
                  top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                  stop=list(params.stop) or None, include_stop_str_in_output=True, logprobs=0,
                  logit_bias={int(i): BANNED_LOGIT_BIAS for i in banned_ids} or None, skip_special_tokens=True)
    if params.seed is not None:
        # Per-request seeds: the same call gives the same samples, different prompts don't share a stream.
        kwargs["seed"] = int(params.seed) + request_index
    return kwargs


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
                 tensor_parallel_size: int = 1, enforce_eager: bool = False, dtype: str = "auto"):
        # The model must live in this process for load_weights to reach it.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.processor = processor
        self.banned_ids = vision_token_ids(processor)
        self.sleep_level = sleep_level
        self.tie_word_embeddings = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        path = model_path or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path:
            raise PrismError("the vllm engine needs the policy's checkpoint directory (model_path)")
        self.llm = LLM(model=str(path), enable_sleep_mode=True, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, limit_mm_per_prompt={"image": max_images_per_prompt},
                       tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager, dtype=dtype,
                       logprobs_mode="processed_logprobs", seed=0)
        self.asleep = False

    def generate(self, prompts: list[RolloutPrompt], params: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VllmSamplingParams

        if self.asleep:
            self.wake()
        requests = [build_request(self.processor, p) for p in prompts]
        per_request = [VllmSamplingParams(**sampling_kwargs(params, self.banned_ids, i)) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, per_request, use_tqdm=False)
        return [[completion_from_output(o) for o in out.outputs] for out in outputs]

    def sync_weights(self, model) -> None:
        """Load `model`'s current weights into vLLM (every rank gathers; vLLM's loader shards them again)."""
        if self.asleep:
            self.wake()
        target = self._vllm_model()
        unwrapped = getattr(model, "module", model)
        target.load_weights(weights_to_load(full_parameters(unwrapped), self.tie_word_embeddings))
        # Cached prefixes were computed with the old weights.
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _vllm_model(self):
        """vLLM's torch model inside this process; the attribute path moved across vLLM versions."""
        executor = self.llm.llm_engine.model_executor
        candidates = ("driver_worker.worker.model_runner.model", "driver_worker.model_runner.model",
                      "driver_worker.worker.model_runner.get_model", "driver_worker.model_runner.get_model")
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
