"""Where a step's time goes, for each hot path: rollout (hf engine), an SFT step, an RL step and an align step,
on the tiny model at the workloads of the side-by-side benchmarks (rollout_throughput, sft_vs_trl, rl_vs_trl).

Two views, each from its own run of the real stage (steps after the first; the first is a warm-up):
- phases: wall time inside named functions of the stage (rollout prefill and decode, sampling, reward scoring,
  collation, logprob forwards, backward, optimizer, discriminator scoring and update), by wrapping them; the
  rest of the step is "other" (Python glue, metrics). No profiler is attached in this run.
- ops: torch.profiler's self CPU time per aten op, grouped (matmul, attention, softmax/sampling, copies and
  layout, elementwise, optimizer, other ops); the step's wall time minus all ops' self time is Python and
  dispatch overhead. The profiler itself adds a little to every op.

    python benchmarks/profile_steps.py [--paths rollout sft rl align] [--steps 4]
Writes benchmarks/results/profile_steps.json. One thread per process; the machine's load is recorded.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl_common as H  # noqa: E402  (single-thread env before torch)

RESULT = H.RESULTS / "profile_steps.json"

# aten op name -> group (first match wins; names are matched by prefix after "aten::")
OP_GROUPS = [
    ("matmul", ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation")),
    ("attention", ("scaled_dot_product", "_scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("softmax/sampling", ("_softmax", "_log_softmax", "softmax", "log_softmax", "multinomial", "cumsum", "sort",
                          "topk", "searchsorted", "argmax", "logsumexp", "_log_softmax_backward", "_softmax_backward")),
    ("optimizer", ("_foreach_", "addcdiv", "addcmul", "lerp", "_fused_adam")),
    ("copies/layout", ("copy_", "cat", "index", "clone", "contiguous", "to", "_to_copy", "empty", "zeros", "ones",
                       "fill_", "zero_", "as_strided", "view", "reshape", "_reshape", "expand", "slice", "select",
                       "narrow", "unsqueeze", "squeeze", "transpose", "permute", "t", "stack", "split", "chunk",
                       "repeat", "masked_fill", "scatter", "gather", "embedding", "pad", "constant_pad", "flip",
                       "new_", "resize_", "unbind", "detach", "alias", "lift", "_unsafe_view", "roll", "where",
                       "nonzero", "arange", "full")),
    ("elementwise", ("add", "mul", "sub", "div", "silu", "rsqrt", "pow", "mean", "neg", "exp", "log", "sum", "sigmoid",
                     "tanh", "gelu", "clamp", "max", "min", "abs", "sqrt", "eq", "ne", "lt", "gt", "le", "ge",
                     "bitwise", "logical", "any", "all", "sign", "minimum", "maximum", "cos", "sin", "norm",
                     "linalg_vector_norm", "reciprocal", "rsub", "threshold", "native_layer_norm", "_rms_norm",
                     "rms_norm", "_fused_rms_norm")),
]


def op_group(name: str) -> str | None:
    """The group of an aten op, None for a non-aten event (autograd nodes, user ranges: not ops)."""
    if not name.startswith("aten::"):
        return None
    op = name[len("aten::"):]
    for group, prefixes in OP_GROUPS:
        if any(op == p or op.startswith(p + "_") or op.startswith(p) and p.endswith("_") for p in prefixes):
            return group
    return "other ops"


class Phases:
    """Wall time inside wrapped functions, counted only while armed (after the warm-up step). Wrapped
    functions must not nest within one another, except where a label says "(within ...)"."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.armed = False
        self.restore: list = []

    def wrap(self, owner, attr: str, label):
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if not self.armed:
                return original(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                name = label(args) if callable(label) else label
                self.seconds[name] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self.restore.append((owner, attr, original))

    def undo(self):
        for owner, attr, original in reversed(self.restore):
            setattr(owner, attr, original)


def arm_after_first_step(phases: Phases, is_step, profiler=None, steps_total: int = 0) -> dict:
    """Arm the phase timer (and start the profiler) when the first training step's metrics are logged; stop
    the profiler at the last one. Returns {"t0", "t1", "steps"}: the timed window."""
    from stages.common.contract import checkpoint

    window = {"t0": None, "t1": None, "steps": 0}
    original = checkpoint.Run.log_metrics

    def log_metrics(self, record):
        out = original(self, record)
        if is_step(record):
            now = time.perf_counter()
            if window["t0"] is None:
                window["t0"], phases.armed = now, True
                if profiler is not None:
                    profiler.start()
            else:
                window["steps"] += 1
                window["t1"] = now
                if profiler is not None and window["steps"] == steps_total - 1:
                    profiler.stop()
        return out

    checkpoint.Run.log_metrics = log_metrics
    phases.restore.append((checkpoint.Run, "log_metrics", original))
    return window


def wrap_common(phases: Phases) -> None:
    from stages.common.policy_update import logprobs, ppo
    from stages.common.rollout import hf
    from stages.common.training import distributed

    phases.wrap(hf.HFEngine, "generate", "rollout (hf engine)")
    phases.wrap(hf.HFEngine, "_decode", "  decode loop (within rollout)")
    phases.wrap(hf, "sample_tokens", "    sampling (within decode)")
    phases.wrap(ppo, "build_policy_batch", "collation (policy batch)")
    phases.wrap(ppo, "response_logprobs", "logprob forward (policy)")
    phases.wrap(distributed.Trained, "backward", lambda a: f"backward ({a[0].name})")
    phases.wrap(distributed.Trained, "step", lambda a: f"optimizer step ({a[0].name})")


def run_stage(path: str, steps: int, profiler=None) -> dict:
    """One run of the stage on `path`'s workload, timed by phase (and by op under a profiler)."""
    from stages.common.contract import config

    phases = Phases()
    wrap_common(phases)
    out = H.WORK / f"profile-{path}"
    try:
        if path == "sft":
            import stages.sft.run as stage
            from stages.sft.config import SFTConfig

            phases.wrap(stage, "collate", "collation (sft batch)")
            phases.wrap(stage, "summed_nll", "forward + loss (policy)")
            cfg = config.resolve(SFTConfig, flags=dict(ckpt="tiny", data=["synth:train:256"], out=str(out),
                                                       overwrite=True, eval_fraction=0.0, batch_size=8,
                                                       micro_batch_size=8, max_steps=steps, lr=1e-4, seed=0,
                                                       save_every=10**9, eval_every=10**9, log_every=1))
            is_step = lambda r: "step_time" in r  # noqa: E731
        elif path == "rl":
            import stages.rl.run as stage
            from stages.rl.config import RLConfig

            phases.wrap(stage, "score_rows", "reward scoring")
            cfg = config.resolve(RLConfig, flags=dict(algo="grpo", ckpt="tiny", data=["synth:train:512"], out=str(out),
                                                      overwrite=True, steps=steps, prompts_per_step=8,
                                                      rollouts_per_prompt=16, max_new_tokens=64, temperature=1.0,
                                                      engine="hf", seed=0, save_every=10**9),
                                 sets=["dynamic_sampling=false", "overlong_buffer=0"])
            is_step = lambda r: "time/rollout" in r  # noqa: E731
        elif path == "align":
            import stages.align.run as stage
            from stages.align.config import AlignConfig

            phases.wrap(stage, "score_rollouts", "discriminator scoring")
            phases.wrap(stage, "game_advantages", "game advantages")
            cfg = config.resolve(AlignConfig, flags=dict(ckpt="tiny", data=["synth:train:512"], out=str(out),
                                                         overwrite=True, steps=steps, prompts_per_step=8,
                                                         rollouts_per_prompt=16, max_new_tokens=64, seed=0,
                                                         warmup_steps=1, warmup_prompts=8, warmup_batch=8,
                                                         save_every=10**9))
            is_step = lambda r: "gap/caption" in r  # noqa: E731
        else:
            raise ValueError(path)
        window = arm_after_first_step(phases, is_step, profiler, steps)
        stage.run(cfg)
    finally:
        phases.undo()
    timed = window["steps"]
    wall = (window["t1"] - window["t0"]) if timed else None
    per_step = {k: v / timed for k, v in sorted(phases.seconds.items())} if timed else {}
    inner = ("(within",)
    top = sum(v for k, v in per_step.items() if not any(s in k for s in inner))
    if wall:
        per_step["other (glue, metrics, python)"] = wall / timed - top
    return {"steps_timed": timed, "step_s": wall / timed if timed else None, "phases_s_per_step": per_step}


def rollout_path(reps: int, profiler=None) -> dict:
    """The hf engine alone at rollout_throughput's workload (8 prompts x 16 samples x 64 tokens)."""
    from stages.common.data.chat import rollout_prompt
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.rollout import SamplingParams, make_engine
    from stages.common.world import synth

    phases = Phases()
    wrap_common(phases)
    try:
        model, processor = load_policy("tiny", train=False), load_processor("tiny")
        engine = make_engine("hf", model, processor)
        prompts = [rollout_prompt(s) for s in synth.load("synth:train:8", seed=0)]
        params = SamplingParams(n=16, temperature=1.0, max_new_tokens=64, seed=0)
        engine.generate(prompts, params)  # warm-up
        phases.armed = True
        if profiler is not None:
            profiler.start()
        t0 = time.perf_counter()
        for rep in range(reps):
            params.seed = rep + 1
            outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        if profiler is not None:
            profiler.stop()
    finally:
        phases.undo()
    tokens = sum(len(c.token_ids) for group in outs for c in group)
    per_call = {k: v / reps for k, v in sorted(phases.seconds.items())}
    per_call["  prefill + encode (within rollout)"] = (per_call["rollout (hf engine)"]
                                                      - per_call.get("  decode loop (within rollout)", 0.0))
    return {"steps_timed": reps, "step_s": wall / reps, "tokens_last_call": tokens, "phases_s_per_step": per_call}


def op_breakdown(prof, wall_s: float, steps: int) -> dict:
    groups: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        group = op_group(ev.key)
        if group is None:
            continue
        seconds = ev.self_cpu_time_total / 1e6
        groups[group] += seconds
        top[ev.key] += seconds
    ops = sum(groups.values())
    out = {g: s / steps for g, s in sorted(groups.items(), key=lambda kv: -kv[1])}
    out["python + dispatch (wall - op self time)"] = (wall_s - ops) / steps
    return {"per_step_s": out, "top_ops": {k: v / steps for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}}


def profile(path: str, steps: int, ops: bool = True) -> dict:
    """Phases from a plain run, then (ops) the op groups from a profiled run of the same work."""
    torch = H.single_thread_torch()
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    plain = rollout_path(steps) if path == "rollout" else run_stage(path, steps)
    if not ops:
        return {"path": path, **plain, "torch": torch.__version__}
    prof = torch_profile(activities=[ProfilerActivity.CPU])
    profiled = rollout_path(steps, prof) if path == "rollout" else run_stage(path, steps, prof)
    wall = profiled["step_s"] * profiled["steps_timed"]
    result = {"path": path, **plain, "ops": op_breakdown(prof, wall, profiled["steps_timed"]),
              "profiled_step_s": profiled["step_s"], "torch": torch.__version__}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", nargs="+", default=["rollout", "sft", "rl", "align"])
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is a warm-up)")
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--no-ops", action="store_true", help="phases only (no profiled run); benchmarks/align_vs_rl.py")
    a = ap.parse_args(argv)
    started = H.now_iso()
    load_before = H.load_average()
    results = {}
    for path in a.paths:
        print(f"profiling {path} ...", flush=True)
        results[path] = profile(path, a.steps, ops=not a.no_ops)
        r = results[path]
        print(f"  {r['step_s']:.3f} s/step; phases: " + ", ".join(f"{k.strip()} {v:.3f}" for k, v in
                                                                  r["phases_s_per_step"].items()))
        if "ops" in r:
            print("  ops: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ops"]["per_step_s"].items()), flush=True)
    H.write_result(Path(a.out), {"benchmark": "profile_steps", "started": started, "finished": H.now_iso(),
                                 "load_average_before": load_before, "load_average_after": H.load_average(),
                                 "machine": H.machine(), "steps": a.steps, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
