"""Where the hf engine's decode step goes, and two changes that looked like wins in isolation.

Issue 34 wants the rollout at 3x plain `generate`; it measured 1.97-2.25x. This probe measures, at
rollout_throughput's workload (tiny, 8 prompts x 16 samples x 64 new tokens, one thread):

1. the decode step's split: wall time inside the shared-prefix attention function, inside transformers' and
   torch.nn's own Python (cProfile's self time in those files: what a hand-written decode forward could save at
   most), and the rest;
2. generated keys stored transposed ([rows, kv heads, head_dim, capacity]): the own-token score matmul q @ K^T
   then reads row-major blocks instead of a transposed view. Timed alone at the engine's shapes (both the matmul
   and the per-step KV write), then in the engine, interleaved with the shipped layout, same seeds, same tokens.

    python benchmarks/decode_attention_probe.py      # -> benchmarks/results/decode_attention_probe.json (~3 min)
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stages.common.rollout import shared_prefix  # noqa: E402

RESULT = Path(__file__).parent / "results" / "decode_attention_probe.json"
ROWS, KV_HEADS, GROUP, HEAD_DIM, PROMPT, NEW = 128, 2, 2, 32, 132, 64


class TransposedKeysLayer(shared_prefix.SharedPrefixLayer):
    """The shipped SharedPrefixLayer with its generated keys stored [rows, kvh, D, capacity]; `keys` stays a
    [rows, kvh, t, D] view, so the attention function runs unchanged and reads K^T without a transpose copy."""

    def _set_buffers(self, keys, values, capacity):
        self.length = keys.shape[-2]
        self.buf_kt = keys.new_empty(*keys.shape[:-2], keys.shape[-1], capacity)
        self.buf_v = values.new_empty(*values.shape[:-2], capacity, values.shape[-1])
        self.buf_kt[..., : self.length] = keys.transpose(-1, -2)
        self.buf_v[..., : self.length, :] = values
        self._refresh_views()

    def _refresh_views(self):
        self.keys = self.buf_kt[..., : self.length].transpose(-1, -2)
        self.values = self.buf_v[..., : self.length, :]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.buf_kt.shape[-1]:
            self._set_buffers(self.keys, self.values, 2 * end)
        self.buf_kt[..., self.length:end] = key_states.transpose(-1, -2)
        self.buf_v[..., self.length:end, :] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.buf_kt, self.buf_v = self.buf_kt[indices], self.buf_v[indices]
        self._refresh_views()


def _per_call(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def isolated(rounds: int) -> dict:
    """Per layer and rollout (t = 1..64 summed): the own-token score matmul and the KV write, both layouts."""
    torch.manual_seed(0)
    q = torch.randn(ROWS, KV_HEADS, GROUP, HEAD_DIM)
    new_k = torch.randn(ROWS, KV_HEADS, 1, HEAD_DIM)
    buf_k = torch.randn(ROWS, KV_HEADS, NEW, HEAD_DIM)         # shipped: [t, D] storage
    buf_kt = torch.randn(ROWS, KV_HEADS, HEAD_DIM, NEW)        # probed: [D, t] storage
    out: dict[str, list[float]] = {k: [] for k in ("matmul_shipped_s", "matmul_transposed_s", "write_shipped_s",
                                                   "write_transposed_s")}
    for _ in range(rounds):
        sums = dict.fromkeys(out, 0.0)
        for t in range(1, NEW + 1, 4):                           # every 4th length, scaled by 4
            sums["matmul_shipped_s"] += 4 * _per_call(lambda: torch.matmul(q, buf_k[..., :t, :].transpose(-1, -2)), 30)
            sums["matmul_transposed_s"] += 4 * _per_call(lambda: torch.matmul(q, buf_kt[..., :t]), 30)
            sums["write_shipped_s"] += 4 * _per_call(lambda: buf_k[..., t - 1:t, :].copy_(new_k), 30)
            sums["write_transposed_s"] += 4 * _per_call(lambda: buf_kt[..., t - 1:t].copy_(new_k.transpose(-1, -2)), 30)
        for k, v in sums.items():
            out[k].append(v)
    return {k: statistics.median(v) for k, v in out.items()}


def _engine():
    from stages.common.data.chat import rollout_prompt
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.rollout import SamplingParams, make_engine
    from stages.common.world import synth

    model, processor = load_policy("tiny", train=False), load_processor("tiny")
    engine = make_engine("hf", model, processor)
    prompts = [rollout_prompt(s) for s in synth.load("synth:train:8", seed=0)]
    return engine, prompts, SamplingParams(n=16, temperature=1.0, max_new_tokens=NEW, seed=0)


def in_engine(rounds: int) -> dict:
    """The rollout with each layout, interleaved call by call (alternating which goes first), same seeds."""
    engine, prompts, params = _engine()
    shipped = shared_prefix.SharedPrefixLayer
    times: dict[str, list[float]] = {"shipped": [], "transposed_keys": []}
    tokens: dict[str, list] = {}
    try:
        for name in times:   # warm-up, one call each
            shared_prefix.SharedPrefixLayer = shipped if name == "shipped" else TransposedKeysLayer
            engine.generate(prompts, params)
        for r in range(rounds):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for name in order:
                shared_prefix.SharedPrefixLayer = shipped if name == "shipped" else TransposedKeysLayer
                params.seed = r + 1
                t0 = time.perf_counter()
                outs = engine.generate(prompts, params)
                times[name].append(time.perf_counter() - t0)
                tokens[name] = [c.token_ids for g in outs for c in g]
    finally:
        shared_prefix.SharedPrefixLayer = shipped
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"rollout_s": medians, "per_round_s": times,
            "speedup_transposed_over_shipped": medians["shipped"] / medians["transposed_keys"],
            "same_tokens_last_round": tokens["shipped"] == tokens["transposed_keys"]}


def split(calls: int) -> dict:
    """cProfile over `calls` rollouts: seconds per rollout in the attention function (cumulative), in
    transformers' and torch.nn's Python (self time), and in all."""
    engine, prompts, params = _engine()
    engine.generate(prompts, params)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for r in range(calls):
        params.seed = r + 1
        engine.generate(prompts, params)
    prof.disable()
    wall = (time.perf_counter() - t0) / calls
    stats = pstats.Stats(prof).stats
    attention = framework = 0.0
    for (filename, _, function), (_, _, self_time, cumulative, _) in stats.items():
        if function == "shared_prefix_attention":
            attention += cumulative
        if "/transformers/" in filename or "/torch/nn/modules/" in filename:
            framework += self_time
    return {"rollout_s_under_cprofile": wall, "attention_function_s": attention / calls,
            "transformers_and_nn_python_s": framework / calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()[0]
    result = {"benchmark": "decode_attention_probe", "started": started,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"kernels {torch.backends.cpu.get_cpu_capability()}",
              "workload": f"tiny, 8 prompts x 16 samples x {NEW} new tokens, one thread",
              "load_average_before": load_before,
              "isolated_per_layer_per_rollout": isolated(args.rounds),
              "in_engine": in_engine(args.rounds),
              "split_per_rollout": split(3),
              "load_average_after": os.getloadavg()[0],
              "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
