"""`prism rl --algo grpo|dapo|gspo`: verifiable-reward RL, read top to bottom.

Each step: draw prompts -> roll out n samples each through the rollout engine -> score them with the
verifiable reward (+ DAPO's overlong shaping) -> (DAPO) drop groups whose accuracy is all equal and draw
more -> group-normalised advantages -> PPO-clip (GRPO/DAPO) or sequence-level clip (GSPO) updates over
token-budget micro-batches -> metrics. Old logprobs are the sampling policy's, returned by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common.contract import checkpoint, console, plots, tracking
from stages.common.contract.config import to_dict
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample, stream_item
from stages.common.data.chat import screened_rollout_prompts
from stages.common.data.formats import dropped_report, load_sources, source_parents
from stages.common.evaluation.held_out import Evaluator
from stages.common.evaluation.options import HELD_OUT_PANEL
from stages.common.evaluation.options import plan_row as eval_plan_row
from stages.common.models.loading import load_policy, load_processor
from stages.common.plan import report as plan_report
from stages.common.policy_update import advantages as advantage_fns
from stages.common.policy_update import losses
from stages.common.policy_update.advantages import dynamic_sampling_keep, overlong_penalty
from stages.common.policy_update.ppo import PPOSettings, ppo_update
from stages.common.rewards.table import load_reward, probe
from stages.common.rollout import (
    OVERLAP_PLAN_NOTE,
    SamplingParams,
    check_engine,
    check_overlap,
    make_engine,
    probe_metrics,
)
from stages.common.rollout.ahead import RolloutsAhead
from stages.common.training import distributed
from stages.common.training import runtime as training
from stages.rl import plan
from stages.rl.algorithms import ALGORITHMS
from stages.rl.config import RLConfig

RL_PANELS = {"reward": {"reward/mean": "reward", "acc/mean": "accuracy", "format/mean": "format"},
             "KL": {"update/kl": "KL to reference", "update/approx_kl": "approx KL to old policy"},
             "entropy": {"update/entropy": "entropy"},
             "response length": {"response_length/mean": "mean", "response_length/max": "max"},
             "clip fraction": {"update/clipfrac": "clipped", "truncated/ratio": "truncated at max_new_tokens"},
             **HELD_OUT_PANEL}


def run(cfg: RLConfig) -> Path:
    """The stage, top to bottom. Long because it is the stage's recipe read in one place: setup, resume,
    the step loop, the save and the learned-nothing checks; each step is a named function below."""
    training.seed_everything(cfg.seed)
    policy_spec = checkpoint.require_stage(checkpoint.resolve(cfg.ckpt), checkpoint.POLICY_STAGES)
    prompts, data_fp, data_parents, dropped = load_prompts(cfg.data, cfg.max_prompt_chars, cfg.seed)
    probe(load_reward(cfg.reward, cfg.acc_weight, cfg.format_weight), prompts[0])  # a broken --reward fails here
    if cfg.dry_run:   # every check a launch runs, at the planned world size, then the memory plan
        return print_plan(cfg, policy_spec, len(prompts))

    cfg.dtype = training.training_dtype(cfg.dtype)  # what runs is what the manifest records
    engine_name = check_engine(cfg.engine)
    checkpoint.check_output(cfg.out, "rl", to_dict(cfg), cfg.overwrite, cfg.resume)
    runtime = training.make_runtime(cfg.dtype, report_to=cfg.report_to, project_dir=cfg.out)
    check_overlap(cfg.overlap, cfg.tis_cap, engine_name, sharded=cfg.overlap > 0 and runtime.backend.shards_parameters)
    accelerator = runtime.accelerator
    check_prompts_per_step(cfg.prompts_per_step, accelerator.num_processes)
    processor = load_processor(policy_spec)
    model = load_policy(policy_spec, dtype=training.MASTER_WEIGHTS_DTYPE, attn=cfg.attn, device=accelerator.device,
                        gradient_checkpointing=cfg.gradient_checkpointing, freeze_vision=cfg.freeze_vision)
    run_dir = checkpoint.open_output(cfg.out, "rl", to_dict(cfg), [("policy", policy_spec), *data_parents],
                                     overwrite=cfg.overwrite, resume=cfg.resume,
                                     barrier=accelerator.wait_for_everyone)
    reference = load_reference(cfg, policy_spec, accelerator.device)
    warmup_steps = training.warmup_steps_from(cfg.warmup, cfg.steps)
    policy = runtime.prepare(model, lambda m: training.build_optimizer(m, cfg.lr, cfg.weight_decay),
                             lambda opt: training.build_scheduler(opt, "constant", warmup_steps, cfg.steps),
                             max_grad_norm=cfg.max_grad_norm, name="policy")
    engine = make_engine(cfg.engine, policy.module, processor, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                         training=True)
    engine.lockstep = distributed.lockstep(accelerator, runtime.backend)
    ahead = RolloutsAhead(engine, policy.module, lag=cfg.overlap)   # --overlap 1: each step's first batch ahead
    tracking.start(accelerator, "rl", to_dict(cfg), cfg.report_to, cfg.out)

    start_step, cursor = 0, 0
    if run_dir.resuming:
        state = training.load_state(accelerator, run_dir.state_dir, [policy])
        if state is not None:
            start_step, cursor = state["step"], state["cursor"]
            console.info(f"resuming {cfg.out} at step {start_step}/{cfg.steps}")
        run_dir.truncate_metrics(start_step)  # killed before the first save: steps logged since are redone
    evaluator = Evaluator.from_config(cfg, accelerator, run_dir)   # None without --eval-tasks
    if evaluator:
        evaluator.baseline(run_dir, accelerator, engine, policy, processor, cfg.report_to)

    timer = training.StepTimer()
    with console.progress(f"rl ({cfg.algo})", total=cfg.steps) as bar:
        bar.advance(start_step)
        for step in range(start_step, cfg.steps):
            rollouts, cursor, sampling = collect_rollouts(cfg, accelerator, policy, engine, ahead, prompts, cursor,
                                                          step, timer)
            if ahead.takes_submissions and step + 1 < cfg.steps:   # the next step's first batch, from these weights
                ahead.submit(*first_batch_request(cfg, accelerator, engine, prompts, cursor, step + 1), policy.module)
            with timer.phase("update"):
                update = policy_update(cfg, accelerator, policy, reference, processor, rollouts)
            if evaluator and evaluator.due(step + 1, cfg.steps):
                with timer.phase("eval"):
                    update.update(evaluator(step + 1, accelerator, engine, policy, processor))
            record = {"step": step + 1, **rollouts.metrics(accelerator), **sampling, **update, **timer.pop(),
                      "lr": policy.lr}
            run_dir.log_metrics(record)
            tracking.log(accelerator, cfg.report_to, record, step + 1)
            bar.advance(status=f"reward {record['reward/mean']:.3f} acc {record['acc/mean']:.3f} "
                               f"fmt {record['format/mean']:.2f}")
            if step == start_step and record["truncated/ratio"] >= 1.0:  # said at once: the run may be stopped
                console.warn(f"every rollout of step {step + 1} hit max_new_tokens={cfg.max_new_tokens} "
                             "without ending")
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                training.save_state(accelerator, run_dir.state_dir, {"step": step + 1, "cursor": cursor}, [policy])

    ahead.close()
    replicas = training.rank_fingerprints(accelerator, policy)   # raises if the processes' weights drifted apart
    training.save_model(accelerator, policy, processor, run_dir.model_dir)
    records = run_dir.read_metrics()
    plots.plot_panels(records, RL_PANELS, run_dir.path / "reward.png", f"prism rl --algo {cfg.algo}")
    engine.close()   # vLLM's teardown first: it destroys the process groups it made
    accelerator.end_training()
    trained = [r for r in records if r["step"] > 0]   # step 0 is the input's held-out evaluation
    summary = dict(summarize(trained), engine=engine.name, processes=accelerator.num_processes,
                   backend=runtime.backend.name, replica_weight_sums=replicas, data_dropped=dropped, reward=cfg.reward,
                   prompts_refused=sum(int(r.get("sampling/refused", 0)) for r in records),
                   **(evaluator.summary(records) if evaluator else {}))
    summary["warnings"] = learning_warnings(trained, cfg.max_new_tokens)
    for warning in summary["warnings"]:
        console.warn(warning)
    return run_dir.finalize(summary=summary, data=data_fp, keep_state=cfg.keep_state)


def load_reference(cfg: RLConfig, policy_spec, device):
    """The frozen starting policy the KL term pulls towards; None when KL is off (the paper's setting)."""
    if cfg.kl_coef <= 0:
        return None
    reference = load_policy(policy_spec, dtype=cfg.dtype, attn=cfg.attn, device=device, train=False)
    reference.requires_grad_(False)
    return reference


# --------------------------------------------------------------------------------------------- data

def load_prompts(specs: list[str], max_prompt_chars: int = 0, seed: int = 0) -> tuple[list[Sample], dict, list, dict]:
    """Problems with a ground-truth answer, from every --data source; questions over max_prompt_chars
    are dropped and counted (one 100 KB question would otherwise take every rollout's memory)."""
    sources = load_sources(specs, keep=lambda s: bool(s.answer.strip()), need="RL needs a ground-truth answer",
                           seed=seed)
    prompts = [s for src in sources for s in src.samples]
    dropped = dropped_report(sources)
    if max_prompt_chars > 0:
        too_long = sum(len(s.question) > max_prompt_chars for s in prompts)
        if too_long:
            prompts = [s for s in prompts if len(s.question) <= max_prompt_chars]
            console.warn(f"--data: dropped {too_long} prompt(s) longer than max_prompt_chars={max_prompt_chars}")
            dropped["max_prompt_chars"] = {"filtered": too_long, "limit": max_prompt_chars}
        if not prompts:
            raise PrismError(f"every prompt is longer than max_prompt_chars={max_prompt_chars}",
                             hint="raise it with --set max_prompt_chars=N")
    return prompts, {src.spec: src.fingerprint for src in sources}, source_parents(sources), dropped


def check_prompts_per_step(prompts_per_step: int, world: int) -> None:
    """prompts_per_step is the global batch: each of the world processes rolls out an equal share. The launch
    and --dry-run (at the planned world size) both call this."""
    if prompts_per_step % world:
        raise UsageError(f"prompts_per_step {prompts_per_step} is not divisible by the {world} processes",
                         hint=f"use a multiple of {world}")


# --------------------------------------------------------------------------------------------- rollouts

@dataclass
class Rollouts:
    """One step's training rows (this process's share): n per kept prompt."""

    prompts: list            # RolloutPrompt per kept prompt
    samples: list[Sample]
    completions: list        # Completion per row
    prompt_index: list[int]  # row -> prompt
    rewards: torch.Tensor
    acc: torch.Tensor
    fmt: torch.Tensor
    all_rewards: list[float]  # every scored row, filtered or not, for reporting
    all_acc: list[float]
    all_fmt: list[float]
    all_lengths: list[int]
    filler: tuple | None = None   # (prompt, completion) drawn here: the zero-weight row of a process left with no group

    def metrics(self, accelerator) -> dict:
        """The step's figures over every process's rows (one all-reduce; each process holds its share)."""
        scored, kept = float(len(self.all_rewards)), float(len(self.completions))
        truncated = float(sum(c.finish_reason == "length" for c in self.completions))
        rewards, acc, fmt, lengths, scored, truncated, kept = training.global_sums(
            accelerator, [sum(self.all_rewards), sum(self.all_acc), sum(self.all_fmt), sum(self.all_lengths),
                          scored, truncated, kept])
        mean = lambda total, count: total / count if count else 0.0  # noqa: E731
        return {"reward/mean": mean(rewards, scored), "acc/mean": mean(acc, scored), "format/mean": mean(fmt, scored),
                "response_length/mean": mean(lengths, scored),
                "response_length/max": training.global_max(accelerator, max(self.all_lengths, default=0)),
                "truncated/ratio": mean(truncated, kept)}


def score_rows(cfg: RLConfig, samples: list[Sample], completions_by_prompt: list[list]) -> tuple:
    rewards, acc, fmt, lengths = [], [], [], []
    buffer = min(cfg.resolved("overlong_buffer"), cfg.max_new_tokens)
    reward = load_reward(cfg.reward, cfg.acc_weight, cfg.format_weight)
    for sample, completions in zip(samples, completions_by_prompt):
        for c in completions:
            s = reward(c.text, sample)
            rewards.append(s["score"])
            acc.append(s["acc"])
            fmt.append(s["format"])
            lengths.append(len(c.token_ids))
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    if buffer > 0:
        rewards_t = rewards_t + overlong_penalty(torch.tensor(lengths), cfg.max_new_tokens, buffer,
                                                 cfg.overlong_penalty)
    return rewards_t, torch.tensor(acc), torch.tensor(fmt), lengths


def draw_batch(cfg: RLConfig, accelerator, processor, prompts: list[Sample], cursor: int, step: int,
               batch: int) -> tuple[list[Sample], list, dict, SamplingParams]:
    """Rollout batch `batch` (1, 2, ...) of `step`, drawn at `cursor`: this process's share of the prompts, their
    rollout prompts (a refused one as a stand-in, with its reason) and the sampling parameters (seeded per step,
    batch and process)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    quota = cfg.prompts_per_step // world   # check_prompts_per_step: divisible
    samples = [stream_item(prompts, cursor + i, cfg.seed) for i in range(rank * quota, (rank + 1) * quota)]
    rollout_prompts, refused = screened_rollout_prompts(samples, processor)
    params = SamplingParams(n=cfg.rollouts_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed * 1_000_003 + step * 1009 + batch * 101 + rank)
    return samples, rollout_prompts, refused, params


def first_batch_request(cfg: RLConfig, accelerator, engine, prompts: list[Sample], cursor: int, step: int) -> tuple:
    """(key, rollout prompts, sampling parameters) of `step`'s first batch, as collect_rollouts draws it."""
    _, rollout_prompts, _, params = draw_batch(cfg, accelerator, engine.processor, prompts, cursor, step, 1)
    return (step, cursor), rollout_prompts, params


def collect_rollouts(cfg: RLConfig, accelerator, policy, engine, ahead: RolloutsAhead, prompts: list[Sample],
                     cursor: int, step: int, timer: training.StepTimer) -> tuple[Rollouts, int, dict]:
    """Sample rollout batches until this step has prompts_per_step useful groups (or the draw limit). The first
    batch comes through `ahead` (generated during the last step's update with --overlap 1); DAPO's refills are
    sampled here, from the current weights. A prompt the processor refuses is rolled out as a stand-in (the
    batch keeps its shape, so the processes run the same forwards and collectives) and never scored or kept.
    Long because the draw loop is one piece: what is kept, what is only reported, and the one global count
    that decides, on every process alike, whether to draw again."""
    world = accelerator.num_processes
    quota = cfg.prompts_per_step // world   # check_prompts_per_step: divisible
    n = cfg.rollouts_per_prompt
    dynamic = cfg.resolved("dynamic_sampling")
    kept = dict(prompts=[], samples=[], completions=[], rewards=[], acc=[], fmt=[])
    seen = dict(rewards=[], acc=[], fmt=[], lengths=[])
    groups_total = groups_kept = batches = refused_total = 0
    while True:
        key = (step, cursor)
        batches += 1
        with timer.phase("rollout"):
            batch_samples, rollout_prompts, refused, params = draw_batch(cfg, accelerator, engine.processor,
                                                                         prompts, cursor, step, batches)
            if batches == 1:
                completions = ahead.take(key, rollout_prompts, params, policy.module)
            else:
                if batches == 2 and cfg.overlap:   # the first batch came from the snapshot: sync the engine now
                    engine.sync_weights(policy.module)
                completions = engine.generate(rollout_prompts, params)
        cursor += quota * world
        with timer.phase("score"):
            rewards, acc, fmt, lengths = score_rows(cfg, batch_samples, completions)
        for reason in refused.values():
            console.warn(f"rl: skipped a prompt the processor refuses ({reason})")
        scored = [r for g in range(len(batch_samples)) if g not in refused for r in range(g * n, (g + 1) * n)]
        seen["rewards"] += rewards[scored].tolist()
        seen["acc"] += acc[scored].tolist()
        seen["fmt"] += fmt[scored].tolist()
        seen["lengths"] += [lengths[r] for r in scored]
        group_ids = torch.arange(len(batch_samples)).repeat_interleave(n)
        if dynamic:
            keep = dynamic_sampling_keep(acc, group_ids).group_mask.tolist()
        else:
            keep = [True] * len(batch_samples)
        keep = [ok and g not in refused for g, ok in enumerate(keep)]   # a stand-in's rows are never trained
        groups_total += len(batch_samples) - len(refused)
        refused_total += len(refused)
        for g, ok in enumerate(keep):
            if ok and len(kept["prompts"]) < quota:
                rows = slice(g * n, (g + 1) * n)
                kept["prompts"].append(rollout_prompts[g])
                kept["samples"].append(batch_samples[g])
                kept["completions"].extend(completions[g])
                kept["rewards"].append(rewards[rows])
                kept["acc"].append(acc[rows])
                kept["fmt"].append(fmt[rows])
                groups_kept += 1
        # every process must draw the same number of batches (they meet in collectives)
        filled = training.global_sum(accelerator, len(kept["prompts"]))
        if not dynamic or filled >= quota * world or batches >= cfg.max_num_gen_batches:
            break
    k = len(kept["prompts"])
    rollouts = Rollouts(
        prompts=kept["prompts"], samples=kept["samples"], completions=kept["completions"],
        prompt_index=[p for p in range(k) for _ in range(n)],
        rewards=torch.cat(kept["rewards"]) if k else torch.zeros(0),
        acc=torch.cat(kept["acc"]) if k else torch.zeros(0), fmt=torch.cat(kept["fmt"]) if k else torch.zeros(0),
        all_rewards=seen["rewards"], all_acc=seen["acc"], all_fmt=seen["fmt"], all_lengths=seen["lengths"],
        filler=(rollout_prompts[0], completions[0][0]))
    # every process calls it: the step's counts over all of them
    drawn, kept_groups, refused_groups = training.global_sums(accelerator, [groups_total, groups_kept, refused_total])
    sampling = {"sampling/gen_batches": batches, "sampling/groups_drawn": int(drawn),
                "sampling/groups_kept": int(kept_groups), "sampling/filled": filled / (quota * world),
                "sampling/refused": int(refused_groups),
                **ahead.metrics(),         # the first batch's policy lag (and, generated ahead, the wait for it)
                **probe_metrics(engine)}   # vllm: this step's sync, engine vs trainer
    return rollouts, cursor, sampling


# --------------------------------------------------------------------------------------------- update

def ppo_settings(cfg: RLConfig) -> PPOSettings:
    return PPOSettings(loss=getattr(losses, ALGORITHMS.get(cfg.algo).loss), clip_low=cfg.resolved("clip_low"),
                       clip_high=cfg.resolved("clip_high"), agg=cfg.resolved("loss_agg"),
                       temperature=cfg.temperature, micro_batch_tokens=cfg.micro_batch_tokens,
                       ppo_epochs=cfg.ppo_epochs, mini_batches=cfg.mini_batches, max_grad_norm=cfg.max_grad_norm,
                       kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, seed=cfg.seed, tis_cap=cfg.tis_cap)


def policy_update(cfg: RLConfig, accelerator, policy, reference, processor, rollouts: Rollouts) -> dict:
    """Group-normalised advantages of the verifiable reward, then the clipped policy update."""
    group_ids = torch.tensor(rollouts.prompt_index, dtype=torch.long)
    advantage = getattr(advantage_fns, ALGORITHMS.get(cfg.algo).advantage)
    advantages = advantage(rollouts.rewards, group_ids, cfg.normalize_std)
    stats = ppo_update(ppo_settings(cfg), accelerator, policy, processor, rollouts.prompts,
                       rollouts.completions, rollouts.prompt_index, advantages, reference=reference,
                       filler=rollouts.filler)
    stats["advantage/mean_abs"] = float(advantages.abs().mean()) if len(advantages) else 0.0
    return stats


# --------------------------------------------------------------------------------------------- reporting

def summarize(records: list[dict]) -> dict:
    def first_last(key):
        vals = [r[key] for r in records if key in r]
        return (vals[0], vals[-1]) if vals else (None, None)

    r0, r1 = first_last("reward/mean")
    a0, a1 = first_last("acc/mean")
    f0, f1 = first_last("format/mean")
    return {"steps": len(records), "first_reward": r0, "final_reward": r1, "first_acc": a0, "final_acc": a1,
            "first_format": f0, "final_format": f1}


def learning_warnings(records: list[dict], max_new_tokens: int) -> list[str]:
    """Signs that a run which exits 0 learned nothing: every rollout cut off at max_new_tokens (the rewards
    score unfinished text), or a zero gradient on every step (every group's rewards were equal, so every
    advantage was 0 and the policy never changed)."""
    if not records:
        return []
    warnings = []
    if all(r.get("truncated/ratio", 0.0) >= 1.0 for r in records):
        warnings.append(f"every rollout of all {len(records)} step(s) hit max_new_tokens={max_new_tokens} without "
                        "ending: the rewards scored cut-off responses; raise --max-new-tokens")
    if all(r.get("update/grad_norm", 0.0) == 0.0 for r in records):
        warnings.append(f"grad_norm was 0.0 on all {len(records)} step(s): the policy did not change (every "
                        "group's rewards were equal, so every advantage was 0)")
    return warnings


def print_plan(cfg: RLConfig, policy_spec, n_prompts: int) -> None:
    """--dry-run: the checks a launch runs before loading anything, at the planned world size (--world-size, or
    the launch's WORLD_SIZE), then the resolved settings and the memory plan."""
    plan_report.check_output_if_set(cfg, "rl")
    check_prompts_per_step(cfg.prompts_per_step, plan_report.world_of(cfg.world_size))
    shape = plan_report.policy_shape(policy_spec)
    rollouts = cfg.prompts_per_step * cfg.rollouts_per_prompt
    rows = [
        ["algorithm", f"{cfg.algo}: clip {cfg.resolved('clip_low')}/{cfg.resolved('clip_high')}, "
                      f"loss {cfg.resolved('loss_agg')}, dynamic sampling {cfg.resolved('dynamic_sampling')}, "
                      f"overlong buffer {min(cfg.resolved('overlong_buffer'), cfg.max_new_tokens)}, KL {cfg.kl_coef}"],
        ["policy", policy_spec.describe()],
        ["prompts", f"{n_prompts} available; {cfg.prompts_per_step} x {cfg.rollouts_per_prompt} = {rollouts} "
                    f"rollouts per step, {cfg.steps} steps"],
        ["batch shapes", f"responses up to {cfg.max_new_tokens} tokens; micro-batches of <= {cfg.micro_batch_tokens} "
                         f"tokens; {cfg.ppo_epochs} epoch(s) x {cfg.mini_batches} mini-batch(es)"],
        ["optimizer", f"AdamW lr {cfg.lr}, warmup {cfg.warmup}, wd {cfg.weight_decay}, clip {cfg.max_grad_norm}"],
        ["parameters", plan_report.parameter_summary(shape) + (" + a frozen reference" if cfg.kl_coef > 0 else "")],
        ["rollout engine", cfg.engine + (OVERLAP_PLAN_NOTE if cfg.overlap else "")],
        *[row for row in [eval_plan_row(cfg, cfg.steps, cfg.steps * rollouts)] if row],
        ["output", cfg.out or "(--out not set)"],
    ]
    console.print_table(f"prism rl --algo {cfg.algo} --dry-run", ["", "plan"], rows)
    plan_report.print_plan(f"prism rl --algo {cfg.algo}", plan.memory_plan(cfg, shape, vllm_sleeps=True))
    return None
