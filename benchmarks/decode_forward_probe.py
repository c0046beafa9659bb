"""What a hand-written decode forward, eager or compiled, would give the hf engine (issue 34's rollout target).

The hf engine's decode step is one transformers forward per token (decoder layers, attention through the
shared-prefix function). Two ideas were left open: a hand-written decode forward (no module calls, no kwargs
plumbing) and a compiled static-shape decode step. This probe writes both for the dense Qwen3-VL text model and
times them against the engine's own forward at one decode state of rollout_throughput's workload (tiny, 8
prompts x 16 samples, the prompts' KV stored once, 10 tokens generated), one thread:

- transformers: `model(input_ids=..., prefix_cache=cache)`, what the engine runs;
- hand-written, eager: torch.nn.functional over the modules' weights, the engine's attention function;
- hand-written, fused weights: the same with q/k/v and gate/up concatenated (copies made once per rollout);
- hand-written, compiled: a static-shape step (generated KV in full-capacity buffers under a -inf bias, the new
  token's own score apart, so no in-graph cache write) under torch.compile(dynamic=True), first call timed.

Each variant's logits are compared with transformers'. Interleaved rounds, medians. The projection to a whole
rollout is arithmetic: the engine's rollout time (measured here) with its decode forwards (timed inside it by
hooks on the model) divided by each variant's speedup at the captured state; the straightforward `generate` of
rollout_throughput.py, measured in the same process, is the ratio's baseline.

    python benchmarks/decode_forward_probe.py      # -> benchmarks/results/decode_forward_probe.json (~3 min)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:   # a cold compile, as a run's first rollout would pay
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="prism-inductor-")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stages.common.rollout import SamplingParams, shared_prefix  # noqa: E402
from stages.common.rollout.hf import HFEngine  # noqa: E402

RESULT = Path(__file__).parent / "results" / "decode_forward_probe.json"
PROMPTS, N, NEW, GENERATED = 8, 16, 64, 10


class _Layer:   # what the engine's attention function reads of a module
    def __init__(self, index: int):
        self.layer_idx = index


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class HandWritten:
    """The dense Qwen3-VL text decoder for one new token per row, in fp32 (the tiny model's dtype): the same
    operations as transformers' modules, without them. Every generated token of a decode row has equal
    M-RoPE components, so its rotary angle is position x inv_freq."""

    def __init__(self, model, fused: bool):
        self.lm, self.head = model.model.language_model, model.lm_head.weight
        cfg = self.lm.config
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps, self.inter = cfg.rms_norm_eps, cfg.intermediate_size
        self.fused = fused
        self.qkv = [torch.cat([l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight])
                    for l in self.lm.layers] if fused else None
        self.gate_up = [torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]) for l in self.lm.layers
                        ] if fused else None
        self.marks = [_Layer(i) for i in range(len(self.lm.layers))]

    def rope(self, positions):
        f = positions.float()[:, None] * self.lm.rotary_emb.inv_freq[None]
        emb = torch.cat([f, f], -1)
        return emb.cos()[:, None], emb.sin()[:, None]

    def step(self, tok, positions, cache):
        rows, H, kvh, D = tok.shape[0], self.heads, self.kv_heads, self.head_dim
        x = F.embedding(tok, self.lm.embed_tokens.weight)
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.lm.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms(x, layer.input_layernorm.weight, self.eps)
            if self.fused:
                qkv = F.linear(h, self.qkv[i])
                q, k, v = qkv[:, :H * D], qkv[:, H * D:(H + kvh) * D], qkv[:, (H + kvh) * D:]
            else:
                q, k, v = F.linear(h, attn.q_proj.weight), F.linear(h, attn.k_proj.weight), F.linear(h, attn.v_proj.weight)
            q = _rotate(_rms(q.view(rows, H, D), attn.q_norm.weight, self.eps), cos, sin)
            k = _rotate(_rms(k.view(rows, kvh, D), attn.k_norm.weight, self.eps), cos, sin)
            keys, values = cache.layers[i].update(k[:, :, None], v.reshape(rows, kvh, D)[:, :, None])
            out, _ = shared_prefix.shared_prefix_attention(self.marks[i], q[:, :, None], keys, values, None,
                                                           prefix_cache=cache)
            x = x + F.linear(out.reshape(rows, H * D), attn.o_proj.weight)
            h = _rms(x, layer.post_attention_layernorm.weight, self.eps)
            if self.fused:
                gu = F.linear(h, self.gate_up[i])
                x = x + F.linear(F.silu(gu[:, :self.inter]) * gu[:, self.inter:], mlp.down_proj.weight)
            else:
                x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                                 mlp.down_proj.weight)
        return F.linear(_rms(x, self.lm.norm.weight, self.eps), self.head)


def static_step(model, tok, positions, own_bias, row_of_slot, slot_of_row, prefix_keys, prefix_values,
                prefix_bias, own_keys, own_values):
    """One decode step with every shape fixed for a rollout: the generated KV in [rows, kvh, capacity, D] buffers
    whose unwritten columns carry -inf in own_bias, the new token's score against its own key computed apart.
    Returns the logits and each layer's new key and value, which the caller writes into the buffers (outside the
    graph, so the compiled function mutates nothing)."""
    lm = model.model.language_model
    cfg = lm.config
    H, kvh, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    G, rows, prompts = H // kvh, tok.shape[0], prefix_keys[0].shape[1]
    width = row_of_slot.shape[0] // prompts
    x = F.embedding(tok, lm.embed_tokens.weight)
    f = positions.float()[:, None] * lm.rotary_emb.inv_freq[None]
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    new_keys, new_values = [], []
    for i, layer in enumerate(lm.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = _rms(x, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q = _rotate(_rms(F.linear(h, attn.q_proj.weight).view(rows, H, D), attn.q_norm.weight, cfg.rms_norm_eps),
                    cos, sin)
        k = _rotate(_rms(F.linear(h, attn.k_proj.weight).view(rows, kvh, D), attn.k_norm.weight, cfg.rms_norm_eps),
                    cos, sin)
        v = F.linear(h, attn.v_proj.weight).view(rows, kvh, D)
        new_keys.append(k)
        new_values.append(v)
        qg = q.view(rows, kvh, G, D) * D ** -0.5
        slots = qg.transpose(0, 1)[:, row_of_slot].reshape(kvh, prompts, width * G, D)
        s_prefix = (torch.matmul(slots, prefix_keys[i].transpose(-1, -2)) + prefix_bias
                    ).reshape(kvh, prompts * width, G, -1)[:, slot_of_row].transpose(0, 1)
        s_own = torch.matmul(qg, own_keys[i].transpose(-1, -2)) + own_bias
        s_new = (qg * k[:, :, None, :]).sum(-1, keepdim=True)
        Lp, C = s_prefix.shape[-1], s_own.shape[-1]
        w = torch.softmax(torch.cat([s_prefix, s_own, s_new], -1), -1)
        w_prefix = w[..., :Lp].transpose(0, 1)[:, row_of_slot].reshape(kvh, prompts, width * G, Lp)
        out = (torch.matmul(w_prefix, prefix_values[i]).reshape(kvh, prompts * width, G, D)[:, slot_of_row]
               .transpose(0, 1) + torch.matmul(w[..., Lp:Lp + C], own_values[i]) + w[..., -1:] * v[:, :, None, :])
        x = x + F.linear(out.reshape(rows, H * D), attn.o_proj.weight)
        h = _rms(x, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                         mlp.down_proj.weight)
    return F.linear(_rms(x, lm.norm.weight, cfg.rms_norm_eps), model.lm_head.weight), new_keys, new_values


def decode_state(engine, prompts, params):
    """The engine's cache, prefix groups and positions after prefill and GENERATED decode steps (captured from a
    real generate call)."""
    captured = {}
    original = HFEngine._decode

    def capture(self, model, cache, groups, logits, prompt_mask, next_pos, rope_deltas, params, generator):
        gen = torch.Generator().manual_seed(0)
        rows = logits.shape[0]
        text_pos = next_pos.view(1, -1, 1)
        mrope = torch.cat([text_pos, (text_pos + rope_deltas.view(1, -1, 1)).expand(3, -1, -1)], 0)
        for _ in range(GENERATED):   # positions held fixed: the timing does not depend on them
            model(input_ids=torch.randint(0, 800, (rows, 1), generator=gen), attention_mask=None,
                  position_ids=mrope, use_cache=True, prefix_cache=cache, cache=cache)
        captured.update(cache=copy.deepcopy(cache), groups=groups, mrope=mrope, positions=next_pos + rope_deltas,
                        tok=torch.randint(0, 800, (rows,), generator=gen))
        return original(self, model, cache, groups, logits, prompt_mask, next_pos, rope_deltas, params, generator)

    HFEngine._decode = capture
    try:
        engine.generate(prompts, params)
    finally:
        HFEngine._decode = original
    return captured


def static_inputs(model, state):
    cache, rows = state["cache"], state["tok"].shape[0]
    cfg = model.model.language_model.config
    own_k, own_v = [], []
    for layer in cache.layers:
        k = torch.zeros(rows, cfg.num_key_value_heads, NEW, cfg.head_dim)
        v = torch.zeros_like(k)
        k[:, :, :GENERATED], v[:, :, :GENERATED] = layer.keys, layer.values
        own_k.append(k)
        own_v.append(v)
    own_bias = torch.full((NEW,), float("-inf"))
    own_bias[:GENERATED] = 0.0
    groups = state["groups"]
    return (state["tok"], state["positions"], own_bias, groups.row_of_slot, groups.slot_of_row,
            [l.prefix_keys for l in cache.layers], [l.prefix_values for l in cache.layers],
            cache.layers[0].prefix_bias, own_k, own_v)


def per_step(rounds: int, steps: int) -> dict:
    from rollout_throughput import make_prompts, tiny_model

    model, processor, image_size = tiny_model()
    model.eval()
    engine = HFEngine(model, processor)
    prompts, params = make_prompts(PROMPTS, image_size), SamplingParams(n=N, temperature=1.0, max_new_tokens=NEW,
                                                                          seed=0)
    with torch.inference_mode():
        state = decode_state(engine, prompts, params)
        variants, first_compiled_call, max_diff = decode_variants(model, state)
        times = {name: [] for name in variants}
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                cache = copy.deepcopy(state["cache"])
                t0 = time.perf_counter()
                for _ in range(steps):
                    variants[name](cache)
                times[name].append((time.perf_counter() - t0) / steps)
        rollout_s, decode_s, generate_s = rollouts_and_generate(model, processor, engine, prompts, rounds)
    medians = {name: statistics.median(v) for name, v in times.items()}
    # each variant's speedup at the captured state, applied to the decode forwards as timed inside the engine
    rest = rollout_s - decode_s
    projected = {name: rest + decode_s * v / medians["transformers"] for name, v in medians.items()}
    return {"step_ms": {k: 1e3 * v for k, v in medians.items()},
            "per_round_ms": {k: [round(1e3 * x, 3) for x in v] for k, v in times.items()},
            "speedup_over_transformers": {k: medians["transformers"] / v for k, v in medians.items()},
            "max_abs_logit_diff_vs_transformers": max_diff,
            "first_compiled_call_s": first_compiled_call,
            "rollout_s": rollout_s, "decode_forwards_in_rollout_s": decode_s, "generate_s": generate_s,
            "rollout_ratio_measured": generate_s / rollout_s, "rest_of_rollout_s": rest,
            "projected_rollout_ratio": {k: generate_s / v for k, v in projected.items()}}


def decode_variants(model, state):
    """{name: one decode step on a cache}, the first compiled call's seconds, and each variant's largest logit
    difference from transformers' at the captured state."""
    eager, fused = HandWritten(model, fused=False), HandWritten(model, fused=True)
    static = static_inputs(model, state)
    compiled = torch.compile(lambda *a: static_step(model, *a), dynamic=True)

    def transformers_step(cache):
        # the engine's decode forward, under the engine's switch of the attention implementation
        with shared_prefix.text_attention(model, shared_prefix.IMPLEMENTATION):
            return model(input_ids=state["tok"].view(-1, 1), attention_mask=None, position_ids=state["mrope"],
                         use_cache=True, prefix_cache=cache, cache=cache).logits[:, -1]

    def static_variant(step):
        def run(_cache):
            logits, keys, values = step(*static)
            for i in range(len(keys)):   # the write a decode loop would do, outside the graph
                static[8][i][:, :, GENERATED] = keys[i]
                static[9][i][:, :, GENERATED] = values[i]
            return logits
        return run

    variants = {"transformers": transformers_step,
                "hand_written": lambda cache: eager.step(state["tok"], state["positions"], cache),
                "hand_written_fused": lambda cache: fused.step(state["tok"], state["positions"], cache),
                "static": static_variant(lambda *a: static_step(model, *a)),
                "static_compiled": static_variant(compiled)}
    t0 = time.perf_counter()
    compiled(*static)
    first_compiled_call = time.perf_counter() - t0
    reference = transformers_step(copy.deepcopy(state["cache"]))
    max_diff = {name: float((run(copy.deepcopy(state["cache"])) - reference).abs().max())
                for name, run in variants.items() if name != "transformers"}
    return variants, first_compiled_call, max_diff


def rollouts_and_generate(model, processor, engine, prompts, rounds) -> tuple[float, float, float]:
    """Median seconds of the engine's rollout, of the decode forwards inside it (timed by hooks on the model: every
    forward of a rollout but its first, the prefill), and of rollout_throughput's straightforward generate,
    alternated."""
    from rollout_throughput import run_engine, run_straightforward

    class Args:
        n, max_new_tokens = N, NEW

    rollout, decode, generate = [], [], []
    for r in range(rounds):
        durations, started = [], []
        hooks = [model.register_forward_pre_hook(lambda *a: started.append(time.perf_counter())),
                 model.register_forward_hook(lambda *a: durations.append(time.perf_counter() - started[-1]))]
        try:
            rollout.append(run_engine(engine, prompts, Args, r + 1)[0])
        finally:
            for hook in hooks:
                hook.remove()
        decode.append(sum(durations[1:]))
        generate.append(run_straightforward(model, processor, prompts, Args, r + 1)[0])
    return statistics.median(rollout), statistics.median(decode), statistics.median(generate)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()[0]
    result = {"benchmark": "decode_forward_probe", "started": started,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"kernels {torch.backends.cpu.get_cpu_capability()}",
              "workload": f"tiny, {PROMPTS} prompts x {N} samples, {GENERATED} tokens generated, one thread; "
                          f"rollouts of {NEW} new tokens",
              "load_average_before": load_before,
              **per_step(args.rounds, args.steps),
              "load_average_after": os.getloadavg()[0],
              "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
