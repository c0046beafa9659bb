"""Feasibility probe (issue 34): does torch.compile (inductor, CPU) of the policy's text decoder layers pay on
prism's hot paths for the tiny model? One torch thread, fp32.

Each path runs through prism's own functions, not re-implementations:
- sft: one training step as stages/sft/run.py's train_loop runs it (step_indices, length-sorted batch, collate,
  summed_nll, Trained.backward and Trained.step), batch 8 of synth:train samples (~190 tokens each). The padded
  length changes from step to step, which is what makes a compiled graph recompile.
- rl: stages.common.policy_update.ppo.ppo_update (the RL/align update: build_policy_batch, response_logprobs
  with shared_prefix=True, loss, backward, optimizer step) on 8 prompts x 16 rollouts x 64 tokens generated
  once per rollout set by the hf engine; several rollout sets (different prompts) so the shapes vary.
- decode: the hf engine's generate (prefill + decode loop) at 8 x 16 x 64.

Each variant runs in its own subprocess next to an eager copy of the same model (same weights, same inputs,
same step sequence); steps alternate eager / compiled in rounds, so both see the same machine load. The
compiled copy's first steps hold its compile time. Recorded per variant: time of the first steps, steady
median, dynamo's graph counts after warm-up (a recompile adds a graph), and the largest difference of the
loss (or logprobs) from eager at each step.

    python benchmarks/compile_probe.py [--runs sft:layers-dynamic rl:layers-dynamic ...]   (~15 min)
Writes benchmarks/results/compile_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl_common as H

RESULT = H.RESULTS / "compile_probe.json"
DEFAULT_RUNS = ["sft:layers-dynamic", "sft:layers-static", "sft:layers-auto", "sft:text-model-dynamic",
                "rl:layers-dynamic", "decode:layers-dynamic"]

# variant -> how the policy is compiled (None: eager). "layers": each text decoder layer's own torch.compile
# (Module.compile); "text-model": the whole language model (decoder stack, rotary, masks) as one compile.
VARIANTS = {
    "layers-dynamic": ("layers", {"dynamic": True}),
    "layers-static": ("layers", {"dynamic": False}),
    "layers-auto": ("layers", {"dynamic": None}),
    "text-model-dynamic": ("text-model", {"dynamic": True}),
}


def text_model(model):
    inner = getattr(model, "module", model)
    return inner.model.language_model


def compile_policy(model, variant: str) -> None:
    where, kwargs = VARIANTS[variant]
    if where == "layers":
        for layer in text_model(model).layers:
            layer.compile(**kwargs)
    else:
        text_model(model).compile(**kwargs)


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]), "frames_ok": int(counters["frames"]["ok"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


# ---------------------------------------------------------------------------------------------- paths

def sft_setup():
    from stages.common.contract import config
    from stages.common.models.loading import load_processor
    from stages.sft import run as stage
    from stages.sft.config import SFTConfig

    cfg = config.resolve(SFTConfig, flags={"ckpt": "tiny", "data": ["synth:train:256"], "eval_fraction": 0.0,
                                           "out": str(H.WORK / "compile-probe"), "batch_size": 8,
                                           "micro_batch_size": 8, "lr": 1e-4, "seed": 0})
    processor = load_processor("tiny")
    mixture = stage.load_mixture(cfg.data, cfg.seed)
    model = new_policy_model()
    train_set = stage.encode_all(mixture.samples, processor, model, cfg, "encoding")
    return cfg, processor, train_set


def new_policy_model():
    from stages.common.models.loading import load_policy
    from stages.common.training import runtime as training

    return load_policy("tiny", dtype=training.MASTER_WEIGHTS_DTYPE)


def prepared(runtime, model, lr: float):
    from stages.common.training import runtime as training

    return runtime.prepare(model, lambda m: training.build_optimizer(m, lr, 0.0),
                           lambda opt: training.build_scheduler(opt, "constant", 0, 10**6), max_grad_norm=1.0,
                           name="policy")


def sft_step(cfg, policy, processor, train_set, step: int) -> dict:
    """train_loop's step body (one process, one micro-batch of 8)."""
    from stages.sft.data import step_indices
    from stages.sft.loss import summed_nll
    from stages.sft.run import collate

    mine = sorted((train_set[i] for i in step_indices(len(train_set), cfg.batch_size, cfg.seed, step)),
                  key=lambda e: e.n_tokens)
    n_targets = sum(e.n_targets for e in mine)
    batch = collate(mine, False, processor.tokenizer.pad_token_id)
    with policy.accumulate(last=True):
        nll, _ = summed_nll(policy.model, batch)
        policy.backward(nll / n_targets)
    grad_norm = policy.step(cfg.max_grad_norm)
    return {"loss": float(nll.detach()) / n_targets, "grad_norm": grad_norm, "padded_len": int(batch["input_ids"].shape[1])}


def rl_setup(n_sets: int):
    """Rollout sets from the eager tiny model: (prompts, completions, prompt_index, advantages) each."""
    import torch

    from stages.common.data.chat import rollout_prompt
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.rollout import SamplingParams, make_engine
    from stages.common.world import synth

    processor = load_processor("tiny")
    engine = make_engine("hf", load_policy("tiny", train=False), processor)
    samples = synth.load("synth:train:64", seed=0)
    sets = []
    for k in range(n_sets):
        prompts = [rollout_prompt(s) for s in samples[8 * k:8 * k + 8]]
        outs = engine.generate(prompts, SamplingParams(n=16, temperature=1.0, max_new_tokens=64, seed=k))
        completions = [c for group in outs for c in group]
        prompt_index = [p for p in range(len(prompts)) for _ in range(16)]
        gen = torch.Generator().manual_seed(k)
        advantages = torch.randn(len(completions), generator=gen)
        sets.append((prompts, completions, prompt_index, advantages))
    return processor, sets


def rl_step(settings, accelerator, policy, processor, rollout_set) -> dict:
    from stages.common.policy_update.ppo import ppo_update

    prompts, completions, prompt_index, advantages = rollout_set
    stats = ppo_update(settings, accelerator, policy, processor, prompts, completions, prompt_index, advantages)
    return {"loss": stats.get("update/loss"), "entropy": stats.get("update/entropy"),
            "grad_norm": stats.get("update/grad_norm"), "gap": stats.get("rollout/gap_max", None),
            "response_len": max(len(c.token_ids) for c in completions)}


def rl_logprob_gap(model_a, model_b, processor, rollout_set) -> float:
    """Largest |logp_a - logp_b| over the response tokens of one rollout set (shared prefix, grad enabled as in
    the update: a no-grad call would need graphs of its own)."""
    from stages.common.policy_update.logprobs import (
        build_policy_batch,
        response_logprobs,
    )

    prompts, completions, prompt_index, _ = rollout_set
    batch = build_policy_batch(processor, prompts, [c.token_ids for c in completions], prompt_index)
    a, _ = response_logprobs(model_a, batch, shared_prefix=True)
    b, _ = response_logprobs(model_b, batch, shared_prefix=True)
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------------------- worker

def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def stepper(path: str, variant: str):
    """(step(name, i) -> record, context) for `path`, with an eager model and one compiled as `variant`."""
    from stages.common.training import runtime as training

    training.seed_everything(0)
    runtime = training.make_runtime("fp32")
    if path == "sft":
        cfg, processor, train_set = sft_setup()
        models = {"eager": new_policy_model(), variant: new_policy_model()}
        compile_policy(models[variant], variant)
        policies = {k: prepared(runtime, m, cfg.lr) for k, m in models.items()}
        return (lambda name, i: sft_step(cfg, policies[name], processor, train_set, i)), {}
    if path == "rl":
        from stages.common.policy_update import losses
        from stages.common.policy_update.ppo import PPOSettings

        processor, sets = rl_setup(4)
        models = {"eager": new_policy_model(), variant: new_policy_model()}
        compile_policy(models[variant], variant)
        policies = {k: prepared(runtime, m, 1e-6) for k, m in models.items()}

        def loss_with_value(*args, **kwargs):   # ppo_clip_loss, its value added to the stats (update/loss)
            loss, stats = losses.ppo_clip_loss(*args, **kwargs)
            return loss, {**stats, "loss": loss.detach()}

        settings = PPOSettings(loss=loss_with_value)
        return (lambda name, i: rl_step(settings, runtime.accelerator, policies[name], processor,
                                        sets[i % len(sets)])), {"processor": processor, "sets": sets}
    if path == "decode":
        return decode_stepper(variant), {}
    raise ValueError(path)


def decode_stepper(variant: str):
    from stages.common.data.chat import rollout_prompt
    from stages.common.models.loading import load_policy, load_processor
    from stages.common.rollout import SamplingParams, make_engine
    from stages.common.world import synth

    processor = load_processor("tiny")
    models = {"eager": load_policy("tiny", train=False), variant: load_policy("tiny", train=False)}
    compile_policy(models[variant], variant)
    engines = {k: make_engine("hf", m, processor) for k, m in models.items()}
    samples = synth.load("synth:train:64", seed=0)

    def step(name, i):
        prompts = [rollout_prompt(s) for s in samples[8 * (i % 4):8 * (i % 4) + 8]]
        outs = engines[name].generate(prompts, SamplingParams(n=16, temperature=1.0, max_new_tokens=64, seed=i))
        flat = [c for g in outs for c in g]
        return {"tokens": sum(len(c.token_ids) for c in flat),
                "first_logprobs": [round(x, 6) for x in flat[0].logprobs[:8]],
                "first_tokens": list(flat[0].token_ids[:8])}

    return step


def measure(step, names: list[str], warmup: int, rounds: int, per_round: int) -> dict:
    """`warmup` steps of each (compile time), then `rounds` rounds of `per_round` steps each, alternating which
    goes first; every step index is run by each name, so their records compare step for step."""
    first = {n: [] for n in names}
    records = {n: {} for n in names}
    for i in range(warmup):
        for n in names:
            s, out = timed(lambda n=n, i=i: step(n, i))
            first[n].append(s)
            records[n][i] = out
    counts0 = dynamo_counts()
    steady = {n: [] for n in names}
    i = warmup
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for _ in range(per_round):
            for n in order:
                s, out = timed(lambda n=n, i=i: step(n, i))
                steady[n].append(s)
                records[n][i] = out
            i += 1
    return {"first_steps_s": first, "steady_s": steady, "steady_median_s": {n: H.median(steady[n]) for n in names},
            "dynamo_after_warmup": counts0, "dynamo_at_end": dynamo_counts(), "records": records}


def worker(path: str, variant: str, warmup: int, rounds: int, per_round: int) -> dict:
    """eager and `variant` side by side in this process (measure), then how far the compiled numbers are
    from eager's."""
    H.single_thread_torch()
    step, context = stepper(path, variant)
    result = {"path": path, "variant": variant, "warmup_steps": warmup, "rounds": rounds, "per_round": per_round,
              **measure(step, ["eager", variant], warmup, rounds, per_round)}
    med, records = result["steady_median_s"], result["records"]
    result["speedup"] = med["eager"] / med[variant]
    if path in ("sft", "rl"):
        keys = [k for k in ("loss", "entropy", "grad_norm") if records["eager"][0].get(k) is not None]
        result["max_abs_diff"] = {k: max(abs(records["eager"][j][k] - records[variant][j][k]) for j in records["eager"])
                                  for k in keys}
        result["max_rel_diff"] = {k: max(abs(records["eager"][j][k] - records[variant][j][k])
                                         / max(abs(records["eager"][j][k]), 1e-12) for j in records["eager"])
                                  for k in keys}
    if path == "rl":
        fresh_eager, fresh = new_policy_model(), new_policy_model()
        compile_policy(fresh, variant)
        result["logprob_max_abs_diff_initial_weights"] = rl_logprob_gap(fresh_eager, fresh, context["processor"],
                                                                        context["sets"][0])
    if path == "decode":
        result["same_first_tokens"] = all(records["eager"][j]["first_tokens"] == records[variant][j]["first_tokens"]
                                          for j in records["eager"])
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="PATH:VARIANT pairs")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--worker", nargs=2, metavar=("PATH", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], a.worker[1], a.warmup, a.rounds, a.per_round), default=str))
        return 0
    out = {"benchmark": "compile_probe", "started": H.now_iso(), "machine": H.machine(), "runs": []}
    for run in a.runs:
        path, variant = run.split(":")
        if True:
            load = H.load_average()
            t0 = time.perf_counter()
            # a fresh inductor cache per run: the first steps then hold a cold compile (as a new machine sees)
            with tempfile.TemporaryDirectory() as cache:
                proc = subprocess.run([sys.executable, __file__, "--worker", path, variant, "--warmup", str(a.warmup),
                                       "--rounds", str(a.rounds), "--per-round", str(a.per_round)],
                                      capture_output=True, text=True, check=False,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                res = {"path": path, "variant": variant, "error": proc.stderr[-3000:]}
            else:
                res = json.loads(line[-1][len("RESULT "):])
            res.update(recompile_limit_hit="recompile_limit" in proc.stderr, load_average_before=load, load_average_after=H.load_average(),
                       wall_s=time.perf_counter() - t0)
            out["runs"].append(res)
            if "error" in res:
                print(f"{path} {variant}: FAILED\n{res['error']}", flush=True)
            else:
                med = res["steady_median_s"]
                print(f"{path} {variant}: eager {med['eager']:.3f} s, compiled {med[variant]:.3f} s, "
                      f"speedup {res['speedup']:.2f}x; first steps {[round(x, 1) for x in res['first_steps_s'][variant]]}; "
                      f"graphs {res['dynamo_after_warmup']} -> {res['dynamo_at_end']}; "
                      f"diff {res.get('max_abs_diff')}; limit hit {res['recompile_limit_hit']}; load {load}", flush=True)
            out["finished"] = H.now_iso()
            H.write_result(Path(a.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
