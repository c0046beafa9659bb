"""`prism align`: PRISM pre-alignment, black-box adversarial on-policy distillation, read top to bottom.

    resolve the policy and the curated data (teacher demonstrations)
    build the MoE discriminator (sparse upcycling of a dense Qwen3-VL, or reuse one)
    warm it up: Bradley-Terry on (teacher, student) caption and think pairs
    each step of the game:
        roll out n responses per prompt from the policy
        split every response into caption and think; score them and the teacher's with the discriminator
        update the discriminator: BT(caption) + BT(think) over format-valid rollouts, L2, router aux loss
        update the policy: PRISM advantages (perception and reasoning group-normalised, format penalty),
        PPO-clip, no KL
    save model/ (the aligned policy) and discriminator/, plot the drift gaps, write the manifest
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch

from stages.align import advantage as prism_adv
from stages.align import plan
from stages.align.config import ADVANTAGE_MODES, AlignConfig
from stages.align.objective import GroupScores, discriminator_objective
from stages.align.scoring import PreferencePair, ScoreResult, pair_loss, pairwise_accuracy, score_groups
from stages.common.contract import checkpoint, console, plots, tracking
from stages.common.contract.config import to_dict
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample, stream_item
from stages.common.data.chat import problem_messages, rollout_prompt, screened_rollout_prompts
from stages.common.data.formats import dropped_report, image_bytes, load_sources, source_parents
from stages.common.evaluation.held_out import Evaluator
from stages.common.evaluation.options import HELD_OUT_PANEL
from stages.common.evaluation.options import plan_row as eval_plan_row
from stages.common.models.discriminator import (
    aux_loss_coef,
    load_discriminator,
    load_discriminator_processor,
    save_discriminator,
    upcycle,
)
from stages.common.models.loading import (
    default_device,
    device_memory_bytes,
    enable_checkpointing,
    load_policy,
    load_processor,
)
from stages.common.plan import report as plan_report
from stages.common.policy_update.ppo import PPOSettings, ppo_update
from stages.common.protocol import parse_response
from stages.common.rewards import compute_score
from stages.common.rollout import (
    OVERLAP_PLAN_NOTE,
    RolloutPrompt,
    SamplingParams,
    check_engine,
    check_overlap,
    make_engine,
    probe_metrics,
)
from stages.common.rollout.ahead import RolloutsAhead
from stages.common.training import distributed
from stages.common.training import runtime as training
from stages.common.training.groups import GroupLayout, group_layout


def run(cfg: AlignConfig) -> Path:
    """The PRISM alignment game: warm the discriminator up on (teacher, student) pairs, then per step roll the
    policy out, score captions and thinks, update the discriminator, then the policy (docs/method.md).

    Long because it is the stage's recipe read top to bottom: two trained models prepared one engine each,
    the warmup, resume, the game loop and the save; each step is a named function below."""
    training.seed_everything(cfg.seed)
    policy_spec = checkpoint.require_stage(checkpoint.resolve(cfg.ckpt), checkpoint.POLICY_STAGES)
    samples, data_fp, data_parents, dropped = load_demonstrations(cfg.data, cfg.seed)
    disc_source = discriminator_source(cfg, policy_spec)
    asked, cfg = cfg, with_disc_settings(with_reused_shape(cfg, disc_source), policy_spec, disc_source)
    if cfg.dry_run:   # every check a launch runs, at the planned world size, then the memory plan
        return print_plan(cfg, policy_spec, disc_source, len(samples), asked)

    cfg.dtype = training.training_dtype(cfg.dtype)  # what runs is what the manifest records
    engine_name = check_engine(cfg.engine)
    checkpoint.check_output(cfg.out, "align", to_dict(cfg), cfg.overwrite, cfg.resume)
    runtime = training.make_runtime(cfg.dtype, report_to=cfg.report_to, project_dir=cfg.out)
    check_overlap(cfg.overlap, cfg.tis_cap, engine_name, sharded=cfg.overlap > 0 and runtime.backend.shards_parameters)
    accelerator = runtime.accelerator
    layout = check_batches(cfg, accelerator.num_processes)
    parents = [("policy", policy_spec), ("discriminator", disc_source[1]), *data_parents]
    processor = load_processor(policy_spec)
    policy_model = load_policy(policy_spec, dtype=training.MASTER_WEIGHTS_DTYPE, attn=cfg.attn,
                               device=accelerator.device, gradient_checkpointing=cfg.gradient_checkpointing,
                               freeze_vision=cfg.freeze_vision)
    disc_model, disc_processor = build_discriminator(cfg, disc_source, accelerator.device)
    run_dir = checkpoint.open_output(cfg.out, "align", to_dict(cfg), parents, overwrite=cfg.overwrite,
                                     resume=cfg.resume, barrier=accelerator.wait_for_everyone)

    # One engine (optimizer state) per trained model; the discriminator's schedule covers warmup then game.
    policy = runtime.prepare(policy_model, lambda m: training.build_optimizer(m, cfg.lr, cfg.weight_decay),
                             lambda opt: training.build_scheduler(opt, "constant", 0, max(cfg.steps, 1)),
                             max_grad_norm=cfg.max_grad_norm, name="policy")
    disc = runtime.prepare(disc_model, lambda m: training.build_optimizer(m, 1.0, cfg.weight_decay),
                           lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, discriminator_lr(cfg)),
                           max_grad_norm=cfg.max_grad_norm, name="discriminator")
    engine = make_engine(cfg.engine, policy.module, processor, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                         training=True)
    engine.lockstep = distributed.lockstep(accelerator, runtime.backend)
    ahead = RolloutsAhead(engine, policy.module, lag=cfg.overlap)   # --overlap 1: each step's rollouts ahead
    tracking.start(accelerator, "align", to_dict(cfg), cfg.report_to, cfg.out)

    state = {"step": 0, "cursor": 0, "warmed_up": False}
    if run_dir.resuming:
        saved = training.load_state(accelerator, run_dir.state_dir, [policy, disc])
        if saved is not None:
            state = saved
            console.info(f"resuming {cfg.out} at step {state['step']}/{cfg.steps}")
        # warmup records carry step 0: an unfinished warmup is redone from scratch, so drop them too
        run_dir.truncate_metrics(state["step"] if state["warmed_up"] else -1)

    if not state["warmed_up"]:
        warmup(cfg, accelerator, policy, engine, disc, disc_processor, samples, run_dir)
        state["warmed_up"] = True
        training.save_state(accelerator, run_dir.state_dir, state, [policy, disc])
    evaluator = Evaluator.from_config(cfg, accelerator, run_dir)   # None without --eval-tasks
    if evaluator:
        evaluator.baseline(run_dir, accelerator, engine, policy, processor, cfg.report_to)

    timer = training.StepTimer()
    with console.progress("align", total=cfg.steps) as bar:
        bar.advance(state["step"])
        for step in range(state["step"], cfg.steps):
            key = (step, state["cursor"])
            batch, state["cursor"], refused = next_prompts(samples, state["cursor"], cfg, layout,
                                                           accelerator.process_index, processor)
            for reason in refused:
                console.warn(f"align: skipped a prompt the processor refuses ({reason})")
            with timer.phase("rollout"):
                completions = ahead.take(key, [p for _, p in batch], rollout_params(cfg, layout, accelerator, step),
                                         policy.module)
            if ahead.takes_submissions and step + 1 < cfg.steps:   # the next step's rollouts, from these weights
                upcoming, _, _ = next_prompts(samples, state["cursor"], cfg, layout, accelerator.process_index,
                                              processor)
                ahead.submit((step + 1, state["cursor"]), [p for _, p in upcoming],
                             rollout_params(cfg, layout, accelerator, step + 1), policy.module)
            with timer.phase("score"):
                scores, rewards, scored = score_rollouts(cfg, disc, disc_processor, batch, completions)
            with timer.phase("disc_update"):
                d_metrics = discriminator_update(cfg, disc, scores, scored)
            with timer.phase("policy_update"):
                advantages, update = policy_update(cfg, layout, accelerator, policy, processor, batch, completions,
                                                   scores.detached(), rewards)
            held_out = {}
            if evaluator and evaluator.due(step + 1, cfg.steps):
                with timer.phase("eval"):
                    held_out = evaluator(step + 1, accelerator, engine, policy, processor)
            record = {"step": step + 1, **d_metrics, **game_metrics(accelerator, scores, rewards, advantages), **update,
                      **held_out, **probe_metrics(engine), **ahead.metrics(), **timer.pop(),
                      # refused: a split group's processes all count it
                      "sampling/refused": training.global_sum(accelerator, len(refused) / layout.ranks_per_group)}
            run_dir.log_metrics(record)
            tracking.log(accelerator, cfg.report_to, record, step + 1)
            bar.advance(status=f"gap caption {record['gap/caption']:+.2f} think {record['gap/think']:+.2f} "
                               f"fmt {record['format/valid']:.2f}")
            state["step"] = step + 1
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                training.save_state(accelerator, run_dir.state_dir, state, [policy, disc])

    ahead.close()
    training.save_model(accelerator, policy, processor, run_dir.model_dir)
    disc_weights = disc.full_state_dict()
    if accelerator.is_main_process:
        save_discriminator(disc.module, disc_processor, run_dir.path / "discriminator", state_dict=disc_weights)
    accelerator.wait_for_everyone()
    records = run_dir.read_metrics()
    plots.plot_panels(records, {"score gap (teacher - student)": {"gap/caption": "perception (caption)",
                                                                   "gap/think": "reasoning (think)"},
                                "discriminator accuracy": {"d/acc_caption": "caption", "d/acc_think": "think"},
                                **HELD_OUT_PANEL},
                      run_dir.path / "drift_gap.png", "PRISM alignment: discriminator score gaps",
                      zero_line=("score gap (teacher - student)",))
    engine.close()   # vLLM's teardown first: it destroys the process groups it made
    accelerator.end_training()
    summary = summarize(records)
    summary.update(engine=engine.name, processes=accelerator.num_processes, backend=runtime.backend.name,
                   data_dropped=dropped, prompts_refused=sum(round(r.get("sampling/refused", 0)) for r in records),
                   **(evaluator.summary(records) if evaluator else {}))
    return run_dir.finalize(summary=summary, data=data_fp, keep_state=cfg.keep_state)


def check_batches(cfg: AlignConfig, world: int) -> GroupLayout:
    """prompts_per_step and warmup_batch are global: each process takes an equal share. Groups are whole per
    process, or (more processes than prompts) split over processes by rollouts (stages.common.training.groups). The
    launch and --dry-run (at the planned world size) both call this."""
    layout = group_layout(cfg.prompts_per_step, cfg.rollouts_per_prompt, world)
    if cfg.warmup_steps > 0 and cfg.warmup_batch % world:
        raise UsageError(f"warmup_batch {cfg.warmup_batch} is not divisible by the {world} processes",
                         hint=f"use a multiple of {world}")
    return layout


def discriminator_lr(cfg: AlignConfig):
    """The discriminator's lr at each of its optimizer steps (base lr 1): warmup_lr on a cosine with 10%
    warmup over the warmup steps, then disc_lr constant through the game. One optimizer, one state."""
    n_warm = max(cfg.warmup_steps, 0)
    warm = training.lr_lambda("cosine", training.warmup_steps_from(0.1, max(n_warm, 1)), max(n_warm, 1))
    return lambda step: cfg.warmup_lr * warm(step) if step < n_warm else cfg.disc_lr


# --------------------------------------------------------------------------------------------- inputs

def load_demonstrations(specs: list[str], seed: int = 0) -> tuple[list[Sample], dict, list, dict]:
    """Prompts with teacher caption/think/answer (synth gets oracle demonstrations; the run's seed draws them)."""
    sources = load_sources(specs, keep=lambda s: s.teacher is not None and bool(s.teacher.caption.strip())
                           and bool(s.teacher.think.strip()),
                           need="alignment needs a teacher caption and think; curate the data first", seed=seed)
    samples = [s for src in sources for s in src.samples]
    return samples, {src.spec: src.fingerprint for src in sources}, source_parents(sources), dropped_report(sources)


def discriminator_source(cfg: AlignConfig, policy_spec) -> tuple[str, checkpoint.CkptSpec]:
    """("reuse", spec of a discriminator dir) or ("upcycle", spec of the dense base)."""
    if cfg.disc:
        path = Path(cfg.disc)
        if (path / checkpoint.MANIFEST).is_file():
            spec = checkpoint.require_stage(checkpoint.resolve(cfg.disc, role="--disc"), ("align",), role="--disc")
            if not (path / "discriminator").is_dir():
                raise PrismError(f"--disc {cfg.disc} has no discriminator/ directory")
            return "reuse", spec
        if not (path / "config.json").is_file():
            raise PrismError(f"--disc {cfg.disc} is neither an align checkpoint nor a discriminator directory")
        return "reuse", checkpoint.CkptSpec(ref=cfg.disc, kind="hf", path=path)
    if cfg.disc_base:
        return "upcycle", checkpoint.resolve(cfg.disc_base, role="--disc-base")
    # default: the policy's base model (the root of its lineage)
    root = checkpoint.lineage(policy_spec)[-1]["ref"]
    return "upcycle", checkpoint.resolve(root, role="--disc-base")


# AlignConfig fields that only shape a discriminator being built (upcycled); a reused one has its own.
_SHAPE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AlignConfig)
                   if f.name in ("num_experts", "top_k", "disc_dense", "disc_text_only")}


def with_reused_shape(cfg: AlignConfig, source) -> AlignConfig:
    """A reused discriminator keeps its own shape: the config (and so the manifest) records the shape
    that runs. A shape the user asked for that differs from the reused one is refused, not ignored."""
    how, spec = source
    if how != "reuse":
        return cfg
    path = spec.path / "discriminator" if spec.kind == "prism" else spec.path
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PrismError(f"--disc {cfg.disc}: {path / 'config.json'} is missing or not JSON") from None
    text = config.get("text_config") or config
    stored = config.get("prism_discriminator") or {}
    dense = stored.get("variant", "moe" if config.get("model_type") == "qwen3_vl_moe" else "dense") == "dense"
    actual = {"disc_dense": dense, "disc_text_only": bool(stored.get("text_only", False)),
              "num_experts": _SHAPE_DEFAULTS["num_experts"] if dense else int(text.get("num_experts", 0)),
              "top_k": _SHAPE_DEFAULTS["top_k"] if dense else int(text.get("num_experts_per_tok", 0))}
    asked = {k: getattr(cfg, k) for k in actual}
    conflicts = [k for k in actual if asked[k] != actual[k] and asked[k] != _SHAPE_DEFAULTS[k]]
    if conflicts:
        raise UsageError(f"--disc {cfg.disc} is reused as it is ({', '.join(f'{k} {actual[k]}' for k in conflicts)}); "
                         f"it cannot take {', '.join(f'{k} {asked[k]}' for k in conflicts)}",
                         hint="leave those options out to reuse it, or drop --disc to upcycle a new discriminator")
    changed = {k: v for k, v in actual.items() if asked[k] != v}
    if changed:
        console.info(f"--disc {cfg.disc}: reused with its own shape ({', '.join(f'{k} {v}' for k, v in changed.items())})")
    for k, v in changed.items():  # set directly: --disc with disc_dense is refused at resolution, rightly
        setattr(cfg, k, v)
    return cfg


def with_disc_settings(cfg: AlignConfig, policy_spec, disc_source) -> AlignConfig:
    """--disc-grad-checkpointing and --disc-layout resolved (stages.align.plan.resolve_disc_settings), so what
    runs is what the manifest records: auto checkpointing asks the memory plan without it, on this device's
    memory (a dry run: on --gpu-memory)."""
    plan_without = None
    if cfg.disc_gradient_checkpointing == "auto" and cfg.disc_layout != "prefix":
        shape, disc_shape = plan_report.align_shapes(cfg, policy_spec, disc_source)
        plan_without = plan.memory_plan(cfg, shape, disc_shape, vllm_sleeps=True, disc_checkpointing=False,
                                        gpu_bytes=None if cfg.dry_run else device_memory_bytes())
    on, layout = plan.resolve_disc_settings(cfg.disc_gradient_checkpointing, cfg.disc_layout, plan_without)
    return dataclasses.replace(cfg, disc_gradient_checkpointing="on" if on else "off", disc_layout=layout)


def build_discriminator(cfg: AlignConfig, source, device):
    how, spec = source
    if how == "reuse":
        path = spec.path / "discriminator" if spec.kind == "prism" else spec.path
        disc = load_discriminator(path, dtype=training.MASTER_WEIGHTS_DTYPE, device=device, train=True)
        if cfg.disc_gradient_checkpointing == "on":
            enable_checkpointing(disc)
        return disc, load_discriminator_processor(path)
    disc = upcycle(spec, num_experts=cfg.num_experts, top_k=cfg.top_k, noise_std=cfg.expert_noise,
                   router_std=cfg.router_std, aux_loss_coef=cfg.aux_loss_coef, seed=cfg.seed, dense=cfg.disc_dense,
                   text_only=cfg.disc_text_only, dtype=training.MASTER_WEIGHTS_DTYPE, device=device)
    if cfg.disc_gradient_checkpointing == "on":
        enable_checkpointing(disc)
    disc.train()
    return disc, load_processor(spec)


def next_prompts(samples: list[Sample], cursor: int, cfg: AlignConfig, layout: GroupLayout,
                 rank: int, processor) -> tuple[list, int, list[str]]:
    """This process's share of the next prompts_per_step (global) prompts of a seeded endless stream (a split
    group's prompt is held by each of its processes), and why any were refused. A prompt whose image the
    processor refuses (or that does not decode) is replaced by the same slot of a later draw that it accepts:
    decided from the stream alone, so the processes of a split group agree, every process keeps its share's
    size, and a resumed run draws the same."""
    batch, refused = [], []
    for i in layout.prompt_indices(rank):
        for later in range(MAX_REFUSED_IN_A_ROW):
            sample = stream_item(samples, cursor + i + later * cfg.prompts_per_step, cfg.seed)
            prompts, reasons = screened_rollout_prompts([sample], processor)
            if not reasons:
                batch.append((sample, prompts[0]))
                break
            refused.append(reasons[0])
        else:
            raise PrismError(f"the processor refuses the images of {MAX_REFUSED_IN_A_ROW} prompts in a row "
                             f"(the last: {refused[-1]})", hint="check the --data images")
    return batch, cursor + cfg.prompts_per_step, refused


MAX_REFUSED_IN_A_ROW = 100


# --------------------------------------------------------------------------------------------- warmup

def warmup(cfg, accelerator, policy, engine, disc, disc_processor, samples, run_dir) -> None:
    """Bradley-Terry warmup of the discriminator on (teacher, student) pairs, held-out accuracy reported."""
    if cfg.warmup_steps <= 0:
        return
    pairs = load_pairs(cfg.warmup_pairs) if cfg.warmup_pairs else sample_pairs(cfg, accelerator, policy, engine,
                                                                                samples)
    rng = random.Random(cfg.seed)
    rng.shuffle(pairs)
    n_held = int(round(cfg.warmup_holdout * len(pairs))) if len(pairs) > 1 else 0
    held, train = pairs[:n_held], pairs[n_held:]
    rank, world = accelerator.process_index, accelerator.num_processes
    # the game's token budget, and as many scoring chunks on every process as on the busiest
    budget = dict(max_row_tokens=cfg.disc_row_tokens, global_chunks=training.count_sync(accelerator))
    before = pairwise_accuracy(disc.model, disc_processor, held, layout=cfg.disc_layout, **budget) if held else None
    with console.progress("discriminator warmup", total=cfg.warmup_steps) as bar:
        for step in range(cfg.warmup_steps):
            start = (step * cfg.warmup_batch) % max(len(train), 1)
            batch = [train[(start + i) % len(train)] for i in range(cfg.warmup_batch)][rank::world]
            loss, metrics, scored = pair_loss(disc.model, disc_processor, batch, layout=cfg.disc_layout,
                                              score_l2_coef=cfg.score_reg, clip=cfg.score_clip,
                                              across=training.processes(accelerator), **budget)
            scored.backward(loss, disc)   # this process's share of the mean over every process's pairs
            grad_norm = disc.step(cfg.max_grad_norm)
            record = {"phase": "warmup", "warmup_step": step + 1, "step": 0, **{f"warmup/{k}": v for k, v in
                                                                                  metrics.items()},
                      "warmup/grad_norm": grad_norm}
            run_dir.log_metrics(record)
            bar.advance(status=f"loss {metrics['loss']:.3f}")
    after = pairwise_accuracy(disc.model, disc_processor, held, layout=cfg.disc_layout, **budget) if held else None
    summary = {"phase": "warmup_done", "step": 0, "warmup/pairs": len(pairs), "warmup/held_out": len(held)}
    if after is not None:
        summary.update({"warmup/heldout_acc_caption_before": before["caption"],
                        "warmup/heldout_acc_think_before": before["think"],
                        "warmup/heldout_acc_caption": after["caption"], "warmup/heldout_acc_think": after["think"]})
        console.info(f"discriminator warmup: held-out pairwise accuracy caption {before['caption']:.2f} -> "
                     f"{after['caption']:.2f}, think {before['think']:.2f} -> {after['think']:.2f} "
                     f"({len(held)} pairs)")
    run_dir.log_metrics(summary)


def sample_pairs(cfg, accelerator, policy, engine, samples) -> list[PreferencePair]:
    """One student response per prompt from the input policy, paired with the teacher's segments. Each
    process samples an equal share of the prompts (the last share padded with repeats whose responses are
    dropped); the responses are then gathered so every process holds the same pairs."""
    rng = random.Random(cfg.seed + 1)
    chosen = rng.sample(samples, min(cfg.warmup_prompts, len(samples)))
    _, refused = screened_rollout_prompts(chosen, engine.processor)   # the same on every process
    for reason in refused.values():
        console.warn(f"align warmup: skipped a prompt the processor refuses ({reason})")
    chosen = [s for i, s in enumerate(chosen) if i not in refused]
    if not chosen:
        raise PrismError("the processor refuses the image of every warmup prompt", hint="check the --data images")
    rank, world = accelerator.process_index, accelerator.num_processes
    share = -(-len(chosen) // world)
    mine = list(range(rank * share, min((rank + 1) * share, len(chosen))))
    padded = mine + [mine[0] if mine else 0] * (share - len(mine))   # equal forwards on every process
    engine.sync_weights(policy.module)
    texts: list[tuple[int, str, str]] = []
    batch_size = 32
    with console.progress("sampling warmup pairs", total=share) as bar:
        for start in range(0, share, batch_size):
            idx = padded[start:start + batch_size]
            outs = engine.generate([rollout_prompt(chosen[i]) for i in idx], SamplingParams(
                n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed * 17 + rank * 7919 + start))
            for k, (i, (completion,)) in enumerate(zip(idx, outs)):
                if start + k < len(mine):
                    parsed = parse_response(completion.text)
                    texts.append((i, parsed.caption or "", parsed.think or ""))
            bar.advance(len(idx))
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, texts)
        texts = sorted(t for part in gathered for t in part)
    pairs = []
    for i, caption, think in texts:
        sample = chosen[i]
        pairs.append(PreferencePair(prompt=rollout_prompt(sample), teacher_caption=sample.teacher.caption,
                                    teacher_think=sample.teacher.think, student_caption=caption,
                                    student_think=think))
    return pairs


def load_pairs(path: str) -> list[PreferencePair]:
    """Warmup pairs in the reference format: prompt, image, teacher_caption, teacher_cot, student_caption,
    student_cot (jsonl with image paths relative to the file or base64; or parquet with image bytes)."""
    p = Path(path)
    if not p.is_file():
        raise PrismError(f"--warmup-pairs {path} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(p).to_pylist()
    else:
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise PrismError(f"--warmup-pairs {path}: line {i + 1} is not JSON") from None
    pairs = []
    required = ("prompt", "teacher_caption", "teacher_cot", "student_caption", "student_cot")
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise PrismError(f"--warmup-pairs {path}: row {i + 1} lacks {', '.join(missing)}")
        images = [] if row.get("image") in (None, "") else [image_bytes(row["image"], p.parent)]
        sample = Sample(id=f"pair-{i}", images=images, question=str(row["prompt"]))
        pairs.append(PreferencePair(prompt=RolloutPrompt(problem_messages(sample), sample.pil_images()),
                                    teacher_caption=str(row["teacher_caption"]), teacher_think=str(row["teacher_cot"]),
                                    student_caption=str(row["student_caption"] or ""),
                                    student_think=str(row["student_cot"] or "")))
    if not pairs:
        raise PrismError(f"--warmup-pairs {path} holds no pairs")
    return pairs


# --------------------------------------------------------------------------------------------- the game

def rollout_params(cfg: AlignConfig, layout: GroupLayout, accelerator, step: int) -> SamplingParams:
    """How this process samples its rollouts of a step (all n of a group, or its slice of a split group); the
    seed differs per process, so the slices of a split group are different samples."""
    return SamplingParams(n=layout.rollouts_per_rank, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                          seed=cfg.seed * 1_000_003 + step * 1009 + accelerator.process_index)


def score_rollouts(cfg: AlignConfig, disc, disc_processor, batch, completions
                   ) -> tuple[GroupScores, dict, ScoreResult]:
    """Parse every rollout and score teacher + rollout captions and thinks, one group per prompt; and the
    verifiable reward of every rollout, {"acc", "score"} [G, n] (stages.common.rewards with the config's
    weights; reported, and used by the acc-gated / rlvr-mixed variants). The ScoreResult backpropagates
    the discriminator's loss (its scoring chunks re-run, as many on every process).

    Segment order per group: [teacher caption, teacher think, caption_1..n, think_1..n] (n: this process's
    rollouts of the group)."""
    n = len(completions[0])
    parsed = [[parse_response(c.text) for c in group] for group in completions]
    segments = [[sample.teacher.caption, sample.teacher.think] + [p.caption or "" for p in group]
                + [p.think or "" for p in group] for (sample, _), group in zip(batch, parsed)]
    result = score_groups(disc.model, disc_processor, [p for _, p in batch], segments, cfg.disc_layout,
                          output_router_logits=True, max_row_tokens=cfg.disc_row_tokens,
                          global_chunks=training.count_sync(disc.accelerator))
    scores = torch.stack(result.scores)                        # [G, 2 + 2n], with grad to the discriminator
    verifiable = [[compute_score(c.text, sample.answer, sample.choices, acc_weight=cfg.acc_weight,
                                 format_weight=cfg.format_weight) for c in group]
                  for (sample, _), group in zip(batch, completions)]
    rewards = {key: torch.tensor([[v[key] for v in group] for group in verifiable], dtype=torch.float32)
               for key in ("acc", "score")}
    return GroupScores(teacher_caption=scores[:, 0], teacher_think=scores[:, 1],
                       student_caption=scores[:, 2:2 + n], student_think=scores[:, 2 + n:],
                       format_ok=torch.tensor([[p.format_ok for p in group] for group in parsed]),
                       aux_loss=result.aux_loss, tokens=result.num_tokens), rewards, result


def discriminator_update(cfg: AlignConfig, disc, scores: GroupScores, scored: ScoreResult) -> dict:
    """One step of the discriminator objective (stages.align.objective) on this step's scores: means over the
    step's pairs on every process."""
    terms = discriminator_objective(scores, score_reg=cfg.score_reg, clip=cfg.score_clip,
                                    aux_coef=aux_loss_coef(disc.module), across=training.processes(disc.accelerator))
    scored.backward(terms.loss, disc)
    return {**terms.metrics("d/"), "d/chunks": scored.num_chunks, "d/grad_norm": disc.step(cfg.max_grad_norm),
            "d/lr": disc.lr}


def policy_update(cfg: AlignConfig, layout: GroupLayout, accelerator, policy, processor, batch, completions,
                  scores: GroupScores, rewards: dict) -> tuple[torch.Tensor, dict]:
    """PRISM advantages from the (pre-update) discriminator scores, then the clipped policy update. A group split
    over processes is gathered whole first: its advantages are normalised over all its rollouts."""
    if layout.ranks_per_group > 1:
        whole_scores, whole_rewards = gather_split_groups(accelerator, layout, scores, rewards)
        advantages = split_group_slice(game_advantages(cfg, whole_scores, whole_rewards), layout,
                                       accelerator.process_index)
    else:
        advantages = game_advantages(cfg, scores, rewards)
    settings = PPOSettings(clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.loss_agg,
                           temperature=cfg.temperature, micro_batch_tokens=cfg.micro_batch_tokens,
                           max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, tis_cap=cfg.tis_cap)
    n = len(completions[0])
    rows = [c for group in completions for c in group]
    update = ppo_update(settings, accelerator, policy, processor, [p for _, p in batch], rows,
                        [g for g in range(len(batch)) for _ in range(n)], advantages)
    return advantages, update


def gather_split_groups(accelerator, layout: GroupLayout, scores: GroupScores,
                        rewards: dict) -> tuple[GroupScores, dict]:
    """Every process's [1, n/k] student scores, format flags and rewards (one slice of a group split over k
    processes), gathered into whole groups [prompts, n], in rank order: slice r % k of group r // k."""
    def whole(t: torch.Tensor) -> torch.Tensor:   # [1, n/k] per process -> [prompts, n]
        return gathered(accelerator, t).reshape(layout.prompts, layout.rollouts)

    return (GroupScores(teacher_caption=gathered(accelerator, scores.teacher_caption)[::layout.ranks_per_group],
                        teacher_think=gathered(accelerator, scores.teacher_think)[::layout.ranks_per_group],
                        student_caption=whole(scores.student_caption), student_think=whole(scores.student_think),
                        format_ok=whole(scores.format_ok).bool(), aux_loss=scores.aux_loss, tokens=scores.tokens),
            {key: whole(value) for key, value in rewards.items()})


def split_group_slice(advantages: torch.Tensor, layout: GroupLayout, rank: int) -> torch.Tensor:
    """This process's rollouts' entries of advantages over whole groups (flat, group-major)."""
    n = layout.rollouts_per_rank
    return advantages[rank * n:(rank + 1) * n]


def game_advantages(cfg: AlignConfig, scores: GroupScores, rewards: dict) -> torch.Tensor:
    """PRISM advantages, optionally gated by or mixed with the verifiable reward (config weights)."""
    caption = scores.student_caption.clamp(-cfg.score_clip, cfg.score_clip).flatten()
    think = scores.student_think.clamp(-cfg.score_clip, cfg.score_clip).flatten()
    fmt = scores.format_ok.flatten()
    groups = torch.arange(scores.format_ok.shape[0]).repeat_interleave(scores.format_ok.shape[1])
    adv = prism_adv.prism_advantages(caption, think, fmt, groups, alpha=cfg.alpha, format_penalty=cfg.format_penalty)
    adjust = getattr(prism_adv, ADVANTAGE_MODES.get(cfg.advantage_mode).adjust)
    return adjust(adv, {key: value.flatten() for key, value in rewards.items()}, groups)


def every_process(accelerator, scores: GroupScores, rewards: dict, advantages: torch.Tensor
                  ) -> tuple[GroupScores, dict, torch.Tensor]:
    """Every process's detached scores, rewards and advantages, concatenated, for the logged figures (each
    process holds an equal share of the step: group_layout). A group split over processes comes back as its
    slices, each with a copy of its teacher scores: the means are the whole group's."""
    scores = scores.detached()
    if accelerator.num_processes == 1:
        return scores, rewards, advantages
    every = lambda t: gathered(accelerator, t)  # noqa: E731
    return (GroupScores(every(scores.teacher_caption), every(scores.teacher_think), every(scores.student_caption),
                        every(scores.student_think), every(scores.format_ok).bool(), None,
                        int(training.global_sum(accelerator, scores.tokens))),
            {key: every(value) for key, value in rewards.items()}, every(advantages))


def gathered(accelerator, t: torch.Tensor) -> torch.Tensor:
    """Every process's copy of `t` (equal shapes), concatenated along dim 0 in rank order, as float on the CPU."""
    return accelerator.gather(t.detach().to(accelerator.device).float().contiguous()).cpu()


def game_metrics(accelerator, scores: GroupScores, rewards: dict, advantages: torch.Tensor) -> dict:
    """Teacher and student mean scores per segment and the drift gap (teacher - student), over every process's
    groups."""
    scores, rewards, advantages = every_process(accelerator, scores, rewards, advantages)
    valid = scores.format_ok
    sc, st = scores.student_caption, scores.student_think
    mean_valid = lambda x: float(x[valid].mean()) if bool(valid.any()) else float("nan")  # noqa: E731
    tc, tt = float(scores.teacher_caption.mean()), float(scores.teacher_think.mean())
    return {
        "score/teacher_caption": tc, "score/teacher_think": tt,
        "score/student_caption": mean_valid(sc), "score/student_think": mean_valid(st),
        "gap/caption": tc - float(sc.mean()), "gap/think": tt - float(st.mean()),
        "format/valid": float(valid.float().mean()), "acc/mean": float(rewards["acc"].mean()),
        "reward/mean": float(rewards["score"].mean()),
        "advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()) if
        advantages.numel() > 1 else 0.0, "advantage/min": float(advantages.min()),
        "advantage/max": float(advantages.max()), "d/tokens": scores.tokens,
    }


# --------------------------------------------------------------------------------------------- reporting

def summarize(records: list[dict]) -> dict:
    game = [r for r in records if "gap/caption" in r]
    warm = [r for r in records if r.get("phase") == "warmup_done"]
    out = {"steps": len(game)}
    for key in ("gap/caption", "gap/think", "format/valid", "acc/mean", "d/acc_caption", "d/acc_think"):
        vals = [r[key] for r in game if key in r]
        if vals:
            k = max(1, len(vals) // 5)  # mean of the first and last fifth: single steps are noisy
            out[f"first_{key}"] = sum(vals[:k]) / k
            out[f"final_{key}"] = sum(vals[-k:]) / k
    if warm:
        out.update({k: v for k, v in warm[-1].items() if k.startswith("warmup/")})
    return out


def disc_settings_row(cfg: AlignConfig, asked: AlignConfig) -> str:
    """The discriminator's resolved layout and checkpointing, each marked with why where `auto` chose it."""
    layout = f"scoring layout {cfg.disc_layout}"
    if asked.disc_layout == "auto":
        layout += " (auto: prefix unless checkpointed)"
    checkpointing = f"gradient checkpointing {cfg.disc_gradient_checkpointing}"
    if asked.disc_gradient_checkpointing == "auto":
        checkpointing += " (auto: only where the plan needs it)"
    return f"{layout}, {checkpointing}"


def print_plan(cfg: AlignConfig, policy_spec, disc_source, n_samples: int, asked: AlignConfig) -> None:
    """--dry-run: the checks a launch runs before loading anything, at the planned world size (--world-size, or
    the launch's WORLD_SIZE), then the resolved settings and the memory plan. asked: the options as given (before
    `auto` was resolved)."""
    plan_report.check_output_if_set(cfg, "align")
    check_batches(cfg, plan_report.world_of(cfg.world_size))
    how, spec = disc_source
    shape, disc_shape = plan_report.align_shapes(cfg, policy_spec, disc_source)
    kind = "dense" if cfg.disc_dense else f"MoE {cfg.num_experts} experts top-{cfg.top_k}"
    rows = [
        ["policy", f"{policy_spec.describe()}: {plan_report.parameter_summary(shape)}"],
        ["discriminator", f"{how} {spec.ref}: {kind}" + (", text-only" if cfg.disc_text_only else "")
                          + f": {plan_report.parameter_summary(disc_shape)}"],
        ["data", f"{n_samples} prompts with teacher demonstrations"],
        ["warmup", f"{cfg.warmup_steps} BT steps x {cfg.warmup_batch} pairs, lr {cfg.warmup_lr} cosine"
                   + (f", pairs from {cfg.warmup_pairs}" if cfg.warmup_pairs else
                      f", pairs sampled from the policy on {min(cfg.warmup_prompts, n_samples)} prompts")],
        ["game", f"{cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.rollouts_per_prompt} rollouts, "
                 f"max {cfg.max_new_tokens} new tokens; alpha {cfg.alpha}, format penalty {cfg.format_penalty}, "
                 f"advantages {cfg.advantage_mode}"],
        ["discriminator memory", disc_settings_row(cfg, asked)],
        ["optimizers", f"policy lr {cfg.lr} constant, discriminator lr {cfg.disc_lr}, wd {cfg.weight_decay}"],
        *[row for row in [eval_plan_row(cfg, cfg.steps, cfg.steps * cfg.prompts_per_step * cfg.rollouts_per_prompt)]
          if row],
        ["rollout engine", cfg.engine + (OVERLAP_PLAN_NOTE if cfg.overlap else "")],
        ["device", str(default_device())],
        ["output", cfg.out or "(--out not set)"],
    ]
    console.print_table("prism align --dry-run", ["", "plan"], rows)
    plan_report.print_plan("prism align", plan.memory_plan(cfg, shape, disc_shape, vllm_sleeps=True))
    return None
