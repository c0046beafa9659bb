"""One RL step, prism against trl's GRPOTrainer: seconds per optimizer step, side by side in one run.

The work of a step on both sides: 8 prompts x 16 rollouts (128 completions), at most 64 new tokens,
temperature 1.0, no vLLM (plain transformers forwards), score with prism's verifiable reward
(stages.common.rewards.compute_score, its "score"), group-normalised advantages, one policy update over
all 128 completions. Same model and starting weights (prism's tiny Qwen3-VL, untrained: random weights
run every completion to the 64-token limit on both sides, the fair worst case), same prompts in the same
order (prism's system prompt + synth image + question; trl gets prism's prompt stream with
shuffle_dataset=False), fp32 on the CPU, one thread.

Configurations, each in its own process, repetitions interleaved round by round:
    trl-gc / trl-nogc       GRPOTrainer: loss_type dapo, beta 0, num_generations 16,
                            per_device_train_batch_size 32 x gradient_accumulation_steps 4 = 128 completions
                            per optimizer step (the shared baseline's layout); gradient checkpointing on
                            (trl default) / off
    prism-dapo              stages.rl.run.run --algo dapo, dynamic sampling OFF (so every step trains on
                            exactly 8 x 16 rollouts, like trl), overlong_buffer 0, engine hf
    prism-grpo, prism-gspo  the same with --algo grpo / gspo

Step time: end to end, previous step end -> this step end (trl: on_step_end callback; prism: successive
metrics.jsonl appends). The first step of every run is a warm-up and is dropped. Splits: prism's own
time/rollout, time/score, time/update; trl's profiling_context timings (generate = transformers.generate,
prepare = _prepare_inputs, the rest = scoring/advantages inside prepare minus generate, and train =
step - prepare).

    bash benchmarks/setup_trl_env.sh
    benchmarks/envs/trl/bin/python benchmarks/rl_vs_trl.py [--steps 6] [--rounds 3]
Writes benchmarks/results/rl_vs_trl.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl_common as H  # noqa: E402  (single-thread env before torch)

CONFIGS = ("trl-gc", "trl-nogc", "prism-dapo", "prism-grpo", "prism-gspo")
PROMPTS_PER_STEP = 8
ROLLOUTS = 16
MAX_NEW_TOKENS = 64
TEMPERATURE = 1.0
SEED = 0
DATA = "synth:train:512"
TARGETS = {f"trl-gc/prism-{algo}": 4.0 for algo in ("dapo", "grpo", "gspo")}   # issue 34
RESULT = H.RESULTS / "rl_vs_trl.json"


def prompt_stream(steps: int):
    """The prompts prism's rl draws for steps 0..steps-1, in order (its own load_prompts/stream_item)."""
    from stages.common.contract.samples import stream_item
    from stages.rl.run import load_prompts

    prompts, *_ = load_prompts([DATA])
    return [stream_item(prompts, k, SEED) for k in range(PROMPTS_PER_STEP * steps)]


def completion_text(completion) -> str:
    if isinstance(completion, list):      # conversational: [{"role": "assistant", "content": ...}]
        content = completion[0]["content"]
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content
    return completion


def as_parts(message: dict) -> dict:
    """String content as one text part (a datasets column needs one content type; the chat template
    renders both the same, which the trl worker checks against prism's prompt text)."""
    content = message["content"]
    return {"role": message["role"],
            "content": [{"type": "text", "text": content}] if isinstance(content, str) else content}


# ------------------------------------------------------------------------------------------ trl worker

def trl_worker(a) -> dict:
    """trl's side of the comparison. Long because every trl knob that matches prism's side is set
    here in one place, so a reader can hold the two configurations side by side line by line."""
    torch = H.single_thread_torch()
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from stages.common.data.chat import problem_messages
    from stages.common.rewards import compute_score
    from stages.common.world import tiny

    model_dir = a.model_dir or str(tiny.ensure("tiny"))
    samples = prompt_stream(a.steps)
    ds = Dataset.from_dict({
        # prism's exact prompt messages (system prompt, then the user turn with its image part)
        "prompt": [[as_parts(m) for m in problem_messages(s, system_prompt=True)] for s in samples],
        "image": [s.pil_images()[0] for s in samples],
        "answer": [s.answer for s in samples],
        "choices": [s.choices or [] for s in samples],
    })

    # Same prompts: what trl renders for generation is, text for text, what prism's engines render.
    from trl.data_utils import prepare_multimodal_messages

    from stages.common.data.chat import rollout_prompt
    from stages.common.rollout.prompts import prompt_text

    check_processor = AutoProcessor.from_pretrained(model_dir)
    same_prompts = all(
        check_processor.apply_chat_template(prepare_multimodal_messages(row["prompt"], images=[row["image"]]),
                                            tokenize=False, add_generation_prompt=True)
        == prompt_text(check_processor, rollout_prompt(s))
        for row, s in zip(ds.select(range(min(len(ds), 16))), samples))

    scored: list[int] = []

    def prism_reward(prompts, completions, answer, choices, **kwargs):
        scored.append(len(completions))
        return [compute_score(completion_text(c), gt, ch or None)["score"]
                for c, gt, ch in zip(completions, answer, choices)]

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir, padding_side="left")
    cfg = GRPOConfig(
        output_dir=str(H.WORK / f"trl-grpo-{a.config}"),
        per_device_train_batch_size=32, gradient_accumulation_steps=4, num_generations=ROLLOUTS,
        max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, beta=0.0, loss_type="dapo",
        use_vllm=False, bf16=False, fp16=False, use_cpu=True, learning_rate=1e-5, max_steps=a.steps,
        logging_steps=1, report_to="none", save_strategy="no", seed=SEED, dataloader_num_workers=0,
        disable_tqdm=True, shuffle_dataset=False, gradient_checkpointing=(a.config == "trl-gc"),
    )
    profile = H.TrlProfile()
    timer = H.trl_step_timer(profile)
    trainer = GRPOTrainer(model=model, reward_funcs=prism_reward, args=cfg, train_dataset=ds,
                          processing_class=processor, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    steps = []
    for i, s in enumerate(timer.steps):
        prof = s["profile"]
        gen = sum(v for k, v in prof.items() if k.endswith(".generate") or "generate" in k.split(".")[-1])
        prep = prof.get("GRPOTrainer._prepare_inputs", 0.0)
        log = logs[i] if i < len(logs) else {}
        mean_len = log.get("completions/mean_length")
        steps.append({"step": s["step"], "step_s": s["step_s"], "generate_s": gen,
                      "prepare_minus_generate_s": prep - gen, "train_s": s["step_s"] - prep,
                      "reward_s": prof.get("GRPOTrainer._calculate_rewards"),
                      "completion_mean_length": mean_len,
                      "generated_tokens": mean_len * cfg.generation_batch_size if mean_len is not None else None,
                      "reward_mean": log.get("reward"), "profile": prof})
    return {"config": a.config, "steps": steps, "train_s": train_s, "completions_scored": sum(scored),
            "same_prompt_text_as_prism": same_prompts,
            "trl_config": {k: getattr(cfg, k) for k in (
                "per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
                "generation_batch_size", "steps_per_generation", "max_completion_length", "temperature",
                "top_p", "top_k", "beta", "loss_type", "importance_sampling_level", "use_vllm",
                "gradient_checkpointing", "shuffle_dataset", "num_iterations")},
            "model_dir": model_dir}


# ------------------------------------------------------------------------------------------ prism worker

def prism_worker(a) -> dict:
    H.single_thread_torch()
    import stages.rl.run as rl_run
    from stages.common.contract import config
    from stages.common.world import tiny
    from stages.rl.config import RLConfig

    stamps = H.timestamp_prism_metrics()
    starts: list[float] = []
    collect = rl_run.collect_rollouts

    def timed_collect(*args, **kwargs):
        starts.append(time.perf_counter())
        return collect(*args, **kwargs)

    rl_run.collect_rollouts = timed_collect
    algo = a.config.split("-", 1)[1]
    out = H.WORK / f"prism-rl-{a.config}"
    cfg = config.resolve(RLConfig, flags=dict(
        algo=algo, ckpt=a.model_dir or "tiny", data=[DATA], out=str(out), overwrite=True, steps=a.steps,
        prompts_per_step=PROMPTS_PER_STEP, rollouts_per_prompt=ROLLOUTS, max_new_tokens=MAX_NEW_TOKENS,
        temperature=TEMPERATURE, engine="hf", seed=SEED, save_every=10**9),
        sets=["dynamic_sampling=false", "overlong_buffer=0"])
    t0 = time.perf_counter()
    rl_run.run(cfg)
    total_s = time.perf_counter() - t0
    records = [r for r in H.read_jsonl(out / "metrics.jsonl") if "time/rollout" in r]
    steps = []
    for i, r in enumerate(records):
        since_prev = stamps[i] - (stamps[i - 1] if i > 0 else starts[0])
        steps.append({"step": r["step"], "step_s": since_prev, "collect_to_log_s": stamps[i] - starts[i],
                      "rollout_s": r.get("time/rollout"), "score_s": r.get("time/score"),
                      "update_s": r.get("time/update"),
                      "completion_mean_length": r.get("response_length/mean"),
                      "generated_tokens": r.get("response_length/mean", 0) * PROMPTS_PER_STEP * ROLLOUTS,
                      "truncated_ratio": r.get("truncated/ratio"), "reward_mean": r.get("reward/mean"),
                      "groups_kept": r.get("sampling/groups_kept"), "gen_batches": r.get("sampling/gen_batches")})
    return {"config": a.config, "steps": steps, "train_s": total_s,
            "prism_config": {"algo": cfg.algo, "dynamic_sampling": cfg.resolved("dynamic_sampling"),
                             "overlong_buffer": cfg.resolved("overlong_buffer"), "loss_agg": cfg.resolved("loss_agg"),
                             "clip_low": cfg.resolved("clip_low"), "clip_high": cfg.resolved("clip_high"),
                             "micro_batch_tokens": cfg.micro_batch_tokens, "engine": cfg.engine,
                             "gradient_checkpointing": cfg.gradient_checkpointing, "kl_coef": cfg.kl_coef},
            "model_dir": a.model_dir or str(tiny.ensure("tiny"))}


# ------------------------------------------------------------------------------------------ driver

SPLIT_KEYS = {"trl": ("generate_s", "prepare_minus_generate_s", "train_s"),
              "prism": ("rollout_s", "score_s", "update_s")}


def summarize(steps: list[dict], side: str) -> dict:
    out = {"median_step_s": H.median([s["step_s"] for s in steps]), "timed_steps": len(steps),
           "median_completion_mean_length": H.median([s["completion_mean_length"] for s in steps]),
           "median_generated_tokens_per_step": H.median([s["generated_tokens"] for s in steps])}
    for k in SPLIT_KEYS[side]:
        out["median_" + k] = H.median([s.get(k) for s in steps])
    return out


def main() -> None:
    """Runs both sides and writes the result. Long because the options, the paired runs and the
    ratios of the result file are one procedure that the README quotes step by step."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first is a warm-up")
    ap.add_argument("--model-dir", default=None, help="start both sides from this HF dir (default: tiny)")
    H.add_driver_args(ap, CONFIGS, RESULT)
    a = ap.parse_args()
    if H.serve_worker(a, trl_worker, prism_worker):
        return

    configs = [c for c in a.configs.split(",") if c]
    extra = ["--model-dir", a.model_dir] if a.model_dir else []
    load_before = H.load_average()
    started = H.now_iso()
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(a.rounds):
        for c in configs:
            print(f"round {r + 1}/{a.rounds}: {c} ...", flush=True)
            res = H.run_worker(Path(__file__), ["--worker", c, "--steps", str(a.steps), *extra])
            res["round"] = r + 1
            side = "trl" if c.startswith("trl") else "prism"
            res["summary"] = summarize(res["steps"][1:], side)
            runs[c].append(res)
            print(f"   step {res['summary']['median_step_s']:.2f}s, mean completion length "
                  f"{res['summary']['median_completion_mean_length']}", flush=True)
    load_after = H.load_average()

    per_config = {}
    for c, rs in runs.items():
        side = "trl" if c.startswith("trl") else "prism"
        per_config[c] = summarize([s for r in rs for s in r["steps"][1:]], side)
        per_config[c]["per_round_median_step_s"] = [round(r["summary"]["median_step_s"], 3) for r in rs]
        per_config[c]["settings"] = rs[0].get("trl_config") or rs[0].get("prism_config")

    def speedup(trl_cfg, prism_cfg):
        if trl_cfg in per_config and prism_cfg in per_config:
            return per_config[trl_cfg]["median_step_s"] / per_config[prism_cfg]["median_step_s"]
        return None

    ratios = {f"{t}/{p}": speedup(t, p) for t in ("trl-gc", "trl-nogc") for p in configs if p.startswith("prism")}
    per_round = {}
    for t in ("trl-gc", "trl-nogc"):
        for p in configs:
            if p.startswith("prism") and t in runs:
                per_round[f"{t}/{p}"] = [round(x["summary"]["median_step_s"] / y["summary"]["median_step_s"], 3)
                                         for x, y in zip(runs[t], runs[p])]
    out = {
        "benchmark": "rl_vs_trl",
        "date": started, "finished": H.now_iso(),
        "target": "trl step time / prism step time >= 4x against trl's default, for grpo, dapo and gspo alike "
                  "(issue 34)",
        "targets_met": H.targets_met(ratios, TARGETS),
        "speedup_trl_over_prism": {k: v for k, v in ratios.items() if v is not None},
        "per_round_speedups": per_round,
        "configs": per_config,
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "note": a.note,
        "machine": H.machine(),
        "setup": {
            "model": (a.model_dir or "prism tiny Qwen3-VL (stages.common.world.tiny.ensure('tiny')), untrained")
                     + "; fp32, CPU, 1 thread",
            "work_per_step": f"{PROMPTS_PER_STEP} prompts x {ROLLOUTS} rollouts, max {MAX_NEW_TOKENS} new tokens, "
                             f"temperature {TEMPERATURE}, one optimizer step over all {PROMPTS_PER_STEP * ROLLOUTS}",
            "data": f"{DATA}, prism's prompt stream (stream_item) on both sides; prism system prompt + image + question",
            "reward": "stages.common.rewards.compute_score(...)['score'] on both sides",
            "prism": "dynamic_sampling=false, overlong_buffer=0, engine hf, prism defaults otherwise",
            "trl": "GRPOTrainer, loss_type dapo, beta 0, 32 x 4 micro-batches, no vLLM, shuffle_dataset False",
            "steps_per_run": a.steps, "warmup_steps_dropped": 1, "rounds": a.rounds,
            "timing": "end to end, previous step end -> this step end",
        },
        "runs": runs,
    }
    H.write_result(Path(a.out), out)
    for k, v in out["speedup_trl_over_prism"].items():
        print(f"speedup {k}: {v:.2f}x")


if __name__ == "__main__":
    main()
