"""prism's own forwards pass the KV cache under the name the installed transformers' forward takes and read it
back under the name the output holds: no deprecation warning on every process of every run (issue 33)."""

from __future__ import annotations

import warnings

import pytest
import torch

from stages.common.policy_update.logprobs import build_policy_batch, response_logprobs
from stages.common.rollout import RolloutPrompt, SamplingParams
from stages.common.rollout.hf import HFEngine
from stages.common.rollout.kv_cache import cache_keyword, output_cache


def _cache_warnings(run, monkeypatch) -> list[str]:
    """Messages about the old cache names from `run()`: FutureWarnings (every one recorded, not once per place)
    and transformers' own once-per-process logger lines (recorded at each call, so an earlier test that
    already printed them cannot hide them)."""
    import transformers.utils.generic as generic

    logged = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: logged.append(str(msg)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    said = logged + [str(w.message) for w in caught]
    return [m for m in said if "past_key_values" in m or "cache_params" in m]


@pytest.fixture(scope="module")
def policy(tiny_path):
    from stages.common.models.loading import load_policy, load_processor

    return load_policy(tiny_path, train=False), load_processor(tiny_path)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_a_rollout_and_a_logprob_pass_warn_nothing_about_cache_names(policy, monkeypatch, shared_prefix):
    from tests.test_rollout import two_prompts

    model, processor = policy
    prompts = two_prompts() + [RolloutPrompt(messages=[{"role": "user", "content": "say something"}])]

    def run():
        res = HFEngine(model, processor, shared_prefix=shared_prefix).generate(
            prompts, SamplingParams(n=2, max_new_tokens=6, seed=1))
        batch = build_policy_batch(processor, prompts, [c.token_ids for g in res for c in g],
                                   [p for p in range(len(prompts)) for _ in range(2)])
        with torch.no_grad():
            response_logprobs(model, batch, chunk_size=5, shared_prefix=shared_prefix)

    assert _cache_warnings(run, monkeypatch) == []


def test_the_keyword_follows_the_forward_signature():
    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=False):
            return {"cache": "kv"}

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return {"past_key_values": "kv"}

    class Wrapped(torch.nn.Module):   # DDP / DeepSpeed: the wrapped model's forward decides
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert cache_keyword(New()) == "cache" and cache_keyword(Wrapped(New())) == "cache"
    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(Wrapped(Old())) == "past_key_values"


def test_the_output_cache_is_read_under_either_name():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    out = CausalLMOutputWithPast(logits=torch.zeros(1))
    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    out[field] = "kv"
    assert output_cache(out) == "kv"

    class OldOutput(dict):   # an output of a transformers that knows only the old name
        past_key_values = "old-kv"

    assert output_cache(OldOutput()) == "old-kv"


def test_checkpointing_is_enabled_without_the_deprecated_name(tiny_path):
    """load_policy(gradient_checkpointing=True) and align's discriminator switch checkpointing on through the
    method the installed transformers names (5.24 warns on gradient_checkpointing_enable)."""
    from stages.common.models.loading import load_policy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_policy(tiny_path, train=True, gradient_checkpointing=True)
    assert [str(w.message) for w in caught if "checkpointing_enable" in str(w.message)] == []
    assert model.is_gradient_checkpointing
