"""KV cache layers with preallocated buffers, for the hf engine's decode loop."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicLayer


def cache_keyword(model) -> str:
    """The forward's name for the KV cache argument: newer transformers 5.x call it `cache` and warn on every
    process that still passes `past_key_values` (the name older ones know); whichever the forward takes."""
    forward = getattr(model, "module", model).forward
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under the new name (`cache`) or the old one, without reading the
    deprecated alias (which warns)."""
    return out["cache"] if "cache" in out else out.past_key_values


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers sized for the whole rollout, so a decode step
    writes one column instead of re-concatenating the cache (torch.cat every step is O(length^2) copying)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, extra_tokens: int):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._set_buffers(keys, values, keys.shape[-2] + extra_tokens)

    def _set_buffers(self, keys, values, capacity):
        self.length = keys.shape[-2]
        shape = (*keys.shape[:-2], capacity, keys.shape[-1])
        self.buf_k = keys.new_empty(shape)
        self.buf_v = values.new_empty(shape)
        self.buf_k[..., : self.length, :] = keys
        self.buf_v[..., : self.length, :] = values
        self._refresh_views()

    def _refresh_views(self):
        self.keys = self.buf_k[..., : self.length, :]
        self.values = self.buf_v[..., : self.length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.buf_k.shape[-2]:  # past the planned length: grow (never happens within one rollout)
            self._set_buffers(self.keys, self.values, 2 * end)
        self.buf_k[..., self.length:end, :] = key_states
        self.buf_v[..., self.length:end, :] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
        self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.buf_k = self.buf_k.repeat_interleave(repeats, dim=0)
        self.buf_v = self.buf_v.repeat_interleave(repeats, dim=0)
        self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        self.length = max(0, self.length - abs(tokens_to_remove)) if tokens_to_remove < 0 else self.length
        self._refresh_views()


def preallocate_cache(cache, extra_tokens: int) -> None:
    """Swap each full-attention DynamicLayer of `cache` for a PreallocatedLayer with room for extra_tokens."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            layers[i] = PreallocatedLayer(layer.keys, layer.values, extra_tokens)
