"""The hf rollout engine: plain transformers forward passes with a KV cache, on a CPU or GPUs (same code).

How a call runs (per chunk of unique prompts):
1. prefill: the unique prompts go through the model once, as one left-padded batch, images through the
   vision tower once; M-RoPE positions (and each row's rope delta) are computed here, explicitly;
2. share: the prompt KV cache stays stored once per prompt and decode attention reads it once per prompt
   for all n samples (stages.common.rollout.shared_prefix; shared_prefix=False repeats it n-fold instead);
   the last-position logits and the per-row rope deltas are repeated n-fold, so the n samples of a
   prompt never re-encode it;
3. decode: a lean loop of model forwards with one new token per row; finished rows are dropped from the
   batch (cache rows included) once enough of them have finished. Sampling is one inverse-CDF draw per
   row, located block by block (no full-vocabulary cumsum, no torch.multinomial).

Logprob convention (what `Completion.logprobs` holds, `stages.common.policy_update.logprobs.sampling_logprobs`, which
`response_logprobs` recomputes with the same `temperature`): for each sampled token, log_softmax(logits / temperature) with the
vision special tokens masked to -inf, over the full vocabulary -- i.e. temperature-scaled, vision tokens
removed, BEFORE top-k/top-p truncation. With top_k=0 and top_p=1 (the RL setting) this is exactly the
distribution sampled from; with truncation, tokens are drawn from the truncated renormalised distribution
but the logprob stays the untruncated one (what the policy gradient differentiates). Greedy decoding
(temperature <= 0) reports logprobs at temperature 1.

Completion.token_ids include the EOS token when a row ends on EOS (so training teaches stopping), and the
tokens up to the one that completed a stop string; text is decoded without special tokens and cut right
after the stop string.
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch

from stages.common.rollout import shared_prefix
from stages.common.rollout.base import Completion, RolloutPrompt, SamplingParams
from stages.common.rollout.kv_cache import cache_keyword, output_cache, preallocate_cache
from stages.common.rollout.prompts import (
    banned_token_mask,
    encode_prompts,
    prompt_positions,
    stop_token_ids,
    tokenizer_of,
    vision_token_ids,
)

# Drop finished rows from the decode batch once this fraction of it has finished: index-selecting the
# cache costs one copy, so doing it every step would cost more than the rows it saves.
COMPACT_FRACTION = 0.25


class HFEngine:
    name = "hf"

    def __init__(self, model, processor, *, prompts_per_prefill: int = 32, max_batch_rows: int = 512,
                 compact_fraction: float = COMPACT_FRACTION, shared_prefix: bool = True):
        self.model = model
        # True: decode attends to each prompt's KV stored once (stages.common.rollout.shared_prefix);
        # False: the prompt KV is repeated n-fold and attended by the model's own attention.
        self.shared_prefix = shared_prefix
        self.processor = processor
        self.prompts_per_prefill = prompts_per_prefill
        self.max_batch_rows = max_batch_rows
        self.compact_fraction = compact_fraction
        self.banned_ids = vision_token_ids(processor)
        self.eos_ids = stop_token_ids(processor, model)
        # Under sharded parameters (FSDP2, ZeRO-3) every forward is a collective: lockstep(this rank still
        # decoding) -> whether any rank is, and the decode loop runs until none is (distributed.lockstep).
        self.lockstep = None

    def sync_weights(self, model) -> None:
        # Same process, same tensors: sampling from `model` is enough.
        self.model = model

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, prompts: list[RolloutPrompt], params: SamplingParams) -> list[list[Completion]]:
        model = getattr(self.model, "module", self.model)
        device = next(model.parameters()).device
        seed = params.seed if params.seed is not None else random.randrange(2**62)
        generator = torch.Generator(device=device).manual_seed(seed)
        per_chunk = max(1, min(self.prompts_per_prefill, self.max_batch_rows // max(1, params.n)))
        was_training = model.training
        model.eval()
        try:
            # Sharded parameters are gathered into buffers the training step reuses: inference tensors there
            # would poison autograd, so those backends sample under no_grad.
            with torch.inference_mode() if self.lockstep is None else torch.no_grad():
                results: list[list[Completion]] = []
                for start in range(0, len(prompts), per_chunk):
                    results += self._generate_chunk(model, prompts[start:start + per_chunk], params, generator)
        finally:
            model.train(was_training)
        return results

    def _generate_chunk(self, model, prompts, params, generator) -> list[list[Completion]]:
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in encode_prompts(self.processor, prompts, padding_side="left").items()}
        positions, rope_deltas = prompt_positions(model, enc)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=positions,
                    pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"),
                    use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        n = params.n
        # Share the prompt across its n samples: its KV stored once (shared_prefix) or repeated n-fold, and
        # every per-row tensor repeated.
        groups = None
        if self.shared_prefix:
            groups = shared_prefix.install(cache, len(prompts), n, enc["attention_mask"], params.max_new_tokens)
        else:
            cache.batch_repeat_interleave(n)
            preallocate_cache(cache, params.max_new_tokens)
        logits = out.logits[:, -1].float().repeat_interleave(n, 0)
        prompt_mask = enc["attention_mask"].repeat_interleave(n, 0)
        next_pos = prompt_mask.sum(-1)                     # text position of the first new token
        rope_deltas = rope_deltas.view(-1).repeat_interleave(n, 0)
        with shared_prefix.text_attention(model, shared_prefix.IMPLEMENTATION) if groups is not None else nullcontext():
            tokens, logprobs, lengths, reasons = self._decode(model, cache, groups, logits, prompt_mask, next_pos,
                                                              rope_deltas, params, generator)
        return self._completions(tokens, logprobs, lengths, reasons, len(prompts), n, params)

    def _decode(self, model, cache, groups, logits, prompt_mask, next_pos, rope_deltas, params, generator):
        rows, device = logits.shape[0], logits.device
        max_new = params.max_new_tokens
        tokens = torch.zeros(rows, max_new, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        lengths = torch.full((rows,), max_new, dtype=torch.long, device=device)
        reasons = ["length"] * rows
        banned = banned_token_mask(logits.shape[-1], self.banned_ids, device)
        eos = torch.tensor(self.eos_ids or [-1], device=device)
        stop_checker = StopStringChecker(self.processor, params.stop) if params.stop else None
        # Repeated-cache path only, preallocated: prompt part, then one column per decode step (1 for every
        # live row). The shared-prefix path keeps the prompt padding in its cache layers instead.
        mask = None if groups is not None else torch.cat(
            [prompt_mask, torch.ones(rows, max_new, dtype=prompt_mask.dtype, device=device)], 1)
        prompt_len = prompt_mask.shape[1]
        live = torch.arange(rows, device=device)           # original row index of each batch row
        alive = torch.ones(rows, dtype=torch.bool, device=device)
        use_4d_mask = model.config._attn_implementation in ("sdpa", "eager")
        cache_arg = cache_keyword(model)
        for step in range(max_new):
            tok, logp = sample_tokens(logits, params.temperature, params.top_k, params.top_p, banned, generator)
            tokens[live, step] = tok   # finished rows write past their length; _completions cuts it off
            logprobs[live, step] = logp
            done = torch.isin(tok, eos)
            if stop_checker is not None:
                done |= stop_checker.hit(tokens[live, : step + 1])
            done &= alive
            if bool(done.any()):
                for r in live[done].tolist():
                    lengths[r] = step + 1
                    reasons[r] = "stop"
                alive &= ~done
            if step + 1 == max_new or not self._still_decoding(bool(alive.any())):
                break
            # Compact: drop finished rows (their cache rows too) once enough have piled up; never to none
            # (a rank whose rows are all done keeps stepping with them while other ranks decode).
            if alive.any() and int((~alive).sum()) >= self.compact_fraction * alive.numel():
                idx = alive.nonzero().squeeze(1)
                cache.batch_select_indices(idx)
                if groups is not None:
                    groups.select(idx)
                else:
                    mask = mask[idx]
                live, tok, next_pos, rope_deltas = live[idx], tok[idx], next_pos[idx], rope_deltas[idx]
                alive = alive[idx]
            text_pos = next_pos.view(1, -1, 1)
            positions = torch.cat([text_pos, (text_pos + rope_deltas.view(1, -1, 1)).expand(3, -1, -1)], 0)
            if groups is not None:  # the prompt padding lives in the cache; generated keys are all valid
                out = model(input_ids=tok.view(-1, 1), attention_mask=None, position_ids=positions,
                            use_cache=True, prefix_cache=cache, **{cache_arg: cache})
                if step == 0:
                    shared_prefix.check_attended(cache)
            else:
                step_mask = mask[:, :prompt_len + step + 1]
                if use_4d_mask:  # skip transformers' per-step mask building: a decode query sees every live key
                    step_mask = step_mask.bool()[:, None, None, :]
                out = model(input_ids=tok.view(-1, 1), attention_mask=step_mask, position_ids=positions,
                            use_cache=True, **{cache_arg: cache})
            logits, next_pos, cache = out.logits[:, -1].float(), next_pos + 1, output_cache(out)
        return tokens, logprobs, lengths, reasons

    def _still_decoding(self, local: bool) -> bool:
        return local if self.lockstep is None else self.lockstep(local)

    def _completions(self, tokens, logprobs, lengths, reasons, n_prompts, n, params) -> list[list[Completion]]:
        tok = tokenizer_of(self.processor)
        tokens, logprobs, lengths = tokens.tolist(), logprobs.tolist(), lengths.tolist()
        results = []
        for p in range(n_prompts):
            group = []
            for r in range(p * n, (p + 1) * n):
                ids = tokens[r][: lengths[r]]
                text = tok.decode(ids, skip_special_tokens=True)
                text = cut_after_stop(text, params.stop)
                group.append(Completion(token_ids=ids, text=text, logprobs=logprobs[r][: lengths[r]],
                                        finish_reason=reasons[r]))
            results.append(group)
        return results


def truncate_top_k_top_p(logp: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set tokens outside the top-k / the top-p nucleus to -inf (always keeping the most likely token)."""
    if top_k and 0 < top_k < logp.shape[-1]:
        kth = logp.topk(top_k, dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.softmax(-1)
        mass_before = probs.cumsum(-1) - probs       # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, float("-inf"))
    return logp


def sample_tokens(logits, temperature, top_k, top_p, banned, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its logprob under the convention above (temperature-scaled, banned removed,
    before truncation). Same values as sampling_logprobs; banned tokens are removed by adding a -inf bias
    row (a broadcast add is several times cheaper than masked_fill on a CPU)."""
    z = logits.float()
    if temperature > 0 and temperature != 1.0:
        z = z / temperature
    if banned is not None:
        z = z + torch.zeros(banned.shape, dtype=z.dtype, device=z.device).masked_fill(banned, float("-inf"))
    if temperature > 0 and not top_k and top_p >= 1.0:
        # The RL setting, on the hot path: one exp pass serves both the draw and the logprob,
        # log p(tok) = z_tok - max - log(sum exp(z - max)), with the sum the sampler's total mass.
        top = z.amax(-1, keepdim=True)
        unnormalised = torch.sub(z, top).exp_()
        tok, total = _inverse_cdf(unnormalised, generator)
        return tok, (z.gather(-1, tok.unsqueeze(-1)) - top - total.log()).squeeze(-1)
    logp = torch.log_softmax(z, dim=-1)
    if temperature <= 0:
        tok = logp.argmax(-1)
    else:
        tok = inverse_cdf_sample(truncate_top_k_top_p(logp, top_k, top_p).exp(), generator)
    return tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, generator, block: int = 128) -> torch.Tensor:
    """One draw per row from unnormalised probabilities [rows, V]: the first index whose cumulative mass
    exceeds u * total, one uniform per row (torch.multinomial was ~20x slower on a CPU for [128, 2048])."""
    return _inverse_cdf(probs, generator, block)[0]


def _inverse_cdf(probs: torch.Tensor, generator, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """inverse_cdf_sample, also returning each row's total mass [rows, 1].

    Two levels, because a cumsum over the whole vocabulary is a sequential scan: first the block of
    `block` tokens the draw lands in (block sums are a vectorised reduction over a view, the ragged last
    block summed apart), then the token within it."""
    rows, vocab = probs.shape
    u = torch.rand(rows, 1, generator=generator, device=probs.device, dtype=probs.dtype)
    n_full = vocab // block
    block_mass = probs[:, : n_full * block].view(rows, n_full, block).sum(-1)
    if n_full * block < vocab:
        block_mass = torch.cat([block_mass, probs[:, n_full * block:].sum(-1, keepdim=True)], 1)
    n_blocks = block_mass.shape[1]
    block_cdf = block_mass.cumsum(-1)
    total = block_cdf[:, -1:]
    target = u * total
    b = torch.searchsorted(block_cdf, target, right=True).clamp_(max=n_blocks - 1)         # [rows, 1]
    rest = target - (block_cdf.gather(1, b) - block_mass.gather(1, b))
    index = b * block + torch.arange(block, device=probs.device)                          # [rows, block]
    inner = probs.gather(1, index.clamp(max=vocab - 1)).masked_fill_(index >= vocab, 0.0)
    j = torch.searchsorted(inner.cumsum(-1), rest, right=True).clamp_(max=block - 1)
    tok = (b * block + j).squeeze(1).clamp_(max=vocab - 1)
    # Rounding can land past the last token with mass; a zero-probability pick must never come out.
    picked_zero = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(picked_zero.any()):
        tok = torch.where(picked_zero, probs.argmax(-1), tok)
    return tok, total


class StopStringChecker:
    """Flags rows whose recent text contains a stop string. Only the tail of each row is decoded: a stop
    string that ends at this step lies within the last len(stop) tokens (every token is >= 1 character)."""

    def __init__(self, processor, stops: list[str]):
        self.tok = tokenizer_of(processor)
        self.stops = [s for s in stops if s]
        self.window = max(len(s) for s in self.stops) + 1 if self.stops else 0

    def hit(self, tokens_so_far: torch.Tensor) -> torch.Tensor:
        tails = tokens_so_far[:, -self.window:].tolist()
        texts = self.tok.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=tokens_so_far.device)


def cut_after_stop(text: str, stops: list[str]) -> str:
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text
