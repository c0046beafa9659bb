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

import json
import random
from pathlib import Path

import torch

from prism_cli import checkpoint, console
from prism_cli.config import to_dict
from prism_cli.errors import PrismError
from stages.align import advantage as prism_adv
from stages.align.config import AlignConfig
from stages.align.discriminator import (load_discriminator, load_discriminator_processor, save_discriminator,
                                        upcycle)
from stages.align.scoring import PreferencePair, clip_scores, pair_loss, pairwise_accuracy, score_groups
from stages.common import training
from stages.common.chat import problem_messages, rollout_prompt
from stages.common.data import Sample, stream_item
from stages.common.formats import load_sources, source_parents
from stages.common import plan_report
from stages.common.models import default_device, load_policy, load_processor
from stages.common.ppo import PPOSettings, ppo_update
from stages.common.protocol import parse_response
from stages.common.rewards import compute_score
from stages.common.rollout import RolloutPrompt, SamplingParams, make_engine

POLICY_STAGES = ("base", "sft", "align", "rl")


def run(cfg: AlignConfig) -> Path:
    training.seed_everything(cfg.seed)
    policy_spec = checkpoint.require_stage(checkpoint.resolve(cfg.ckpt), POLICY_STAGES)
    samples, data_fp, data_parents = load_demonstrations(cfg.data)
    disc_source = discriminator_source(cfg, policy_spec)
    if cfg.dry_run:
        return print_plan(cfg, policy_spec, disc_source, len(samples))

    checkpoint.check_output(cfg.out, "align", to_dict(cfg), cfg.overwrite, cfg.resume)
    accelerator = training.make_accelerator(report_to=cfg.report_to, project_dir=cfg.out)
    parents = [("policy", policy_spec), ("discriminator", disc_source[1]), *data_parents]
    processor = load_processor(policy_spec)
    policy = load_policy(policy_spec, dtype=cfg.dtype, attn=cfg.attn, device=accelerator.device,
                         gradient_checkpointing=cfg.gradient_checkpointing, freeze_vision=cfg.freeze_vision)
    disc, disc_processor = build_discriminator(cfg, disc_source, accelerator.device)
    run_dir = checkpoint.open_output(cfg.out, "align", to_dict(cfg), parents, overwrite=cfg.overwrite,
                                     resume=cfg.resume, barrier=accelerator.wait_for_everyone)

    warmup_pairs_total = max(cfg.warmup_steps, 1)
    policy_opt = training.build_optimizer(policy, cfg.lr, cfg.weight_decay)
    policy_sched = training.build_scheduler(policy_opt, "constant", 0, max(cfg.steps, 1))
    disc_opt = training.build_optimizer(disc, cfg.disc_lr, cfg.weight_decay)
    disc_sched = training.build_scheduler(disc_opt, "constant", 0, max(cfg.steps, 1))
    warm_opt = training.build_optimizer(disc, cfg.warmup_lr, cfg.weight_decay)
    warm_sched = training.build_scheduler(warm_opt, "cosine", training.warmup_steps_from(0.1, warmup_pairs_total),
                                          warmup_pairs_total)
    (policy, policy_opt, policy_sched, disc, disc_opt, disc_sched, warm_opt,
     warm_sched) = accelerator.prepare(policy, policy_opt, policy_sched, disc, disc_opt, disc_sched, warm_opt,
                                       warm_sched)
    engine = make_engine(cfg.engine, training.unwrap(accelerator, policy), processor,
                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, training=True)

    state = {"step": 0, "cursor": 0, "warmed_up": False}
    if run_dir.resuming:
        saved = training.load_state(accelerator, run_dir.state_dir)
        if saved is not None:
            state = saved
            console.info(f"resuming {cfg.out} at step {state['step']}/{cfg.steps}")
        # warmup records carry step 0: an unfinished warmup is redone from scratch, so drop them too
        run_dir.truncate_metrics(state["step"] if state["warmed_up"] else -1)

    if not state["warmed_up"]:
        warmup(cfg, accelerator, policy, engine, disc, disc_processor, warm_opt, warm_sched, samples, run_dir)
        state["warmed_up"] = True
        training.save_state(accelerator, run_dir.state_dir, state)

    settings = PPOSettings(clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.loss_agg,
                           temperature=cfg.temperature, micro_batch_tokens=cfg.micro_batch_tokens,
                           max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
    timer = training.StepTimer()
    with console.progress("align", total=cfg.steps) as bar:
        bar.advance(state["step"])
        for step in range(state["step"], cfg.steps):
            batch, state["cursor"] = next_prompts(samples, state["cursor"], cfg, accelerator)
            with timer.phase("rollout"):
                engine.sync_weights(training.unwrap(accelerator, policy))
                completions = engine.generate([p for _, p in batch], SamplingParams(
                    n=cfg.rollouts_per_prompt, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                    seed=cfg.seed * 1_000_003 + step * 1009 + accelerator.process_index))
            with timer.phase("score"):
                game = score_rollouts(cfg, disc, disc_processor, batch, completions)
            with timer.phase("disc_update"):
                d_metrics = discriminator_update(cfg, accelerator, disc, disc_opt, disc_sched, game)
            with timer.phase("policy_update"):
                advantages = game_advantages(cfg, game)
                rows = [c for group in completions for c in group]
                update = ppo_update(settings, accelerator, policy, policy_opt, policy_sched, processor,
                                    [p for _, p in batch], rows, game["prompt_index"], advantages)
            record = {"step": step + 1, **d_metrics, **game_metrics(game, advantages), **update, **timer.pop()}
            run_dir.log_metrics(record)
            if cfg.report_to != "none":
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step + 1)
            bar.advance(status=f"gap caption {record['gap/caption']:+.2f} think {record['gap/think']:+.2f} "
                               f"fmt {record['format/valid']:.2f}")
            state["step"] = step + 1
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                training.save_state(accelerator, run_dir.state_dir, state)

    training.save_model(accelerator, policy, processor, run_dir.model_dir)
    if accelerator.is_main_process:
        save_discriminator(training.unwrap(accelerator, disc), disc_processor, run_dir.path / "discriminator")
    accelerator.wait_for_everyone()
    records = run_dir.read_metrics()
    training.plot_curves(records, {"gap/caption": "perception gap (teacher - student, caption)",
                                   "gap/think": "reasoning gap (teacher - student, think)"},
                         run_dir.path / "drift_gap.png", "PRISM alignment: discriminator score gaps")
    accelerator.end_training()
    return run_dir.finalize(summary=summarize(records), data=data_fp, keep_state=cfg.keep_state)


# --------------------------------------------------------------------------------------------- inputs

def load_demonstrations(specs: list[str]) -> tuple[list[Sample], dict, list]:
    """Prompts with teacher caption/think/answer (synth gets oracle demonstrations)."""
    sources = load_sources(specs, keep=lambda s: s.teacher is not None and bool(s.teacher.caption.strip())
                           and bool(s.teacher.think.strip()),
                           need="alignment needs a teacher caption and think; curate the data first")
    samples = [s for src in sources for s in src.samples]
    return samples, {src.spec: src.fingerprint for src in sources}, source_parents(sources)


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


def build_discriminator(cfg: AlignConfig, source, device):
    how, spec = source
    if how == "reuse":
        path = spec.path / "discriminator" if spec.kind == "prism" else spec.path
        disc = load_discriminator(path, dtype=cfg.dtype, device=device, train=True)
        if cfg.disc_gradient_checkpointing:
            disc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return disc, load_discriminator_processor(path)
    disc = upcycle(spec, num_experts=cfg.num_experts, top_k=cfg.top_k, noise_std=cfg.expert_noise,
                   router_std=cfg.router_std, aux_loss_coef=cfg.aux_loss_coef, seed=cfg.seed, dense=cfg.disc_dense,
                   text_only=cfg.disc_text_only, dtype=cfg.dtype if cfg.dtype != "auto" else
                   ("bf16" if device.type == "cuda" else "fp32"), device=device)
    if cfg.disc_gradient_checkpointing:
        disc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disc.train()
    return disc, load_processor(spec)


def next_prompts(samples: list[Sample], cursor: int, cfg: AlignConfig, accelerator) -> tuple[list, int]:
    """This process's share of the next prompts_per_step prompts of a seeded endless stream."""
    rank, world = accelerator.process_index, accelerator.num_processes
    quota = max(1, cfg.prompts_per_step // world)
    picked = [stream_item(samples, cursor + i, cfg.seed) for i in range(rank * quota, (rank + 1) * quota)]
    return [(s, rollout_prompt(s)) for s in picked], cursor + quota * world


# --------------------------------------------------------------------------------------------- warmup

def warmup(cfg, accelerator, policy, engine, disc, disc_processor, optimizer, scheduler, samples, run_dir) -> None:
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
    before = pairwise_accuracy(disc, disc_processor, held, layout=cfg.disc_layout) if held else None
    with console.progress("discriminator warmup", total=cfg.warmup_steps) as bar:
        for step in range(cfg.warmup_steps):
            start = (step * cfg.warmup_batch) % max(len(train), 1)
            batch = [train[(start + i) % len(train)] for i in range(cfg.warmup_batch)][rank::world]
            loss, metrics = pair_loss(disc, disc_processor, batch, layout=cfg.disc_layout,
                                      score_l2_coef=cfg.score_reg, clip=cfg.score_clip)
            accelerator.backward(loss)  # mean over this process's pairs; DDP averages the processes
            grad_norm = training.optimizer_step(accelerator, disc, optimizer, scheduler, cfg.max_grad_norm)
            record = {"phase": "warmup", "warmup_step": step + 1, "step": 0, **{f"warmup/{k}": v for k, v in
                                                                                  metrics.items()},
                      "warmup/grad_norm": grad_norm}
            run_dir.log_metrics(record)
            bar.advance(status=f"loss {metrics['loss']:.3f}")
    after = pairwise_accuracy(disc, disc_processor, held, layout=cfg.disc_layout) if held else None
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
    """One student response per prompt from the input policy, paired with the teacher's segments."""
    rng = random.Random(cfg.seed + 1)
    chosen = rng.sample(samples, min(cfg.warmup_prompts, len(samples)))
    engine.sync_weights(training.unwrap(accelerator, policy))
    pairs = []
    batch_size = 32
    with console.progress("sampling warmup pairs", total=len(chosen)) as bar:
        for start in range(0, len(chosen), batch_size):
            group = chosen[start:start + batch_size]
            prompts = [rollout_prompt(s) for s in group]
            outs = engine.generate(prompts, SamplingParams(n=1, temperature=cfg.temperature,
                                                           max_new_tokens=cfg.max_new_tokens,
                                                           seed=cfg.seed * 17 + start))
            for sample, prompt, (completion,) in zip(group, prompts, outs):
                parsed = parse_response(completion.text)
                pairs.append(PreferencePair(prompt=prompt, teacher_caption=sample.teacher.caption,
                                            teacher_think=sample.teacher.think,
                                            student_caption=parsed.caption or "", student_think=parsed.think or ""))
            bar.advance(len(group))
    return pairs


def load_pairs(path: str) -> list[PreferencePair]:
    """Warmup pairs in the reference format: prompt, image, teacher_caption, teacher_cot, student_caption,
    student_cot (jsonl with image paths relative to the file or base64; or parquet with image bytes)."""
    from stages.common.formats import image_bytes

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

def score_rollouts(cfg: AlignConfig, disc, disc_processor, batch, completions) -> dict:
    """Parse every rollout and score teacher + rollout captions and thinks, one group per prompt.

    Segment order per group: [teacher caption, teacher think, caption_1..n, think_1..n]."""
    n = cfg.rollouts_per_prompt
    parsed = [[parse_response(c.text) for c in group] for group in completions]
    segments = [[sample.teacher.caption, sample.teacher.think] + [p.caption or "" for p in group]
                + [p.think or "" for p in group] for (sample, _), group in zip(batch, parsed)]
    result = score_groups(disc, disc_processor, [p for _, p in batch], segments, cfg.disc_layout,
                          output_router_logits=True, max_row_tokens=cfg.disc_row_tokens)
    scores = torch.stack(result.scores)                        # [G, 2 + 2n], with grad to the discriminator
    acc = torch.tensor([[compute_score(c.text, sample.answer, sample.choices)["acc"] for c in group]
                        for (sample, _), group in zip(batch, completions)], dtype=torch.float32)
    return {
        "teacher_caption": scores[:, 0], "teacher_think": scores[:, 1],
        "student_caption": scores[:, 2:2 + n], "student_think": scores[:, 2 + n:],
        "format_ok": torch.tensor([[p.format_ok for p in group] for group in parsed]),
        "acc": acc, "aux_loss": result.aux_loss, "tokens": result.num_tokens,
        "prompt_index": [g for g in range(len(batch)) for _ in range(n)],
    }


def discriminator_update(cfg: AlignConfig, accelerator, disc, optimizer, scheduler, game: dict) -> dict:
    """BT(caption) + BT(think) over format-valid rollouts, each against its prompt's teacher segment;
    L2 on the four score sets; router aux loss. Scores clipped to [-score_clip, score_clip]."""
    valid = game["format_ok"].to(game["student_caption"].device)
    tc = clip_scores(game["teacher_caption"], cfg.score_clip)
    tt = clip_scores(game["teacher_think"], cfg.score_clip)
    sc = clip_scores(game["student_caption"], cfg.score_clip)
    st = clip_scores(game["student_think"], cfg.score_clip)
    tc_pairs, tt_pairs = tc[:, None].expand_as(sc), tt[:, None].expand_as(st)
    bt_caption = prism_adv.bradley_terry_loss(tc_pairs, sc, valid)
    bt_think = prism_adv.bradley_terry_loss(tt_pairs, st, valid)
    loss = bt_caption + bt_think + cfg.score_reg * prism_adv.score_l2(tc, tt, sc[valid], st[valid])
    aux = game["aux_loss"]
    coef = cfg.aux_loss_coef if not cfg.disc_dense else 0.0
    if aux is not None and coef:
        loss = loss + coef * aux
    accelerator.backward(loss)
    grad_norm = training.optimizer_step(accelerator, disc, optimizer, scheduler, cfg.max_grad_norm)
    with torch.no_grad():
        n_valid = int(valid.sum())
        acc_c = float(((tc_pairs > sc) & valid).sum() / max(n_valid, 1))
        acc_t = float(((tt_pairs > st) & valid).sum() / max(n_valid, 1))
    return {"d/loss": float(loss.detach()), "d/bt_caption": float(bt_caption.detach()),
            "d/bt_think": float(bt_think.detach()),
            "d/aux_loss": float(aux.detach()) if aux is not None else 0.0, "d/acc_caption": acc_c,
            "d/acc_think": acc_t,
            "d/grad_norm": grad_norm, "d/valid_pairs": n_valid}


def game_advantages(cfg: AlignConfig, game: dict) -> torch.Tensor:
    """PRISM advantages from the (pre-update) discriminator scores, optionally mixed with the verifiable reward."""
    caption = game["student_caption"].detach().clamp(-cfg.score_clip, cfg.score_clip).flatten().cpu()
    think = game["student_think"].detach().clamp(-cfg.score_clip, cfg.score_clip).flatten().cpu()
    fmt = game["format_ok"].flatten()
    groups = torch.tensor(game["prompt_index"])
    adv = prism_adv.prism_advantages(caption, think, fmt, groups, alpha=cfg.alpha, format_penalty=cfg.format_penalty)
    if cfg.advantage_mode == "acc-gated":
        adv = prism_adv.acc_gated_advantages(adv, game["acc"].flatten())
    elif cfg.advantage_mode == "rlvr-mixed":
        rlvr = 0.8 * game["acc"].flatten() + 0.2 * fmt.float()
        adv = prism_adv.rlvr_mixed_advantages(adv, rlvr, groups)
    return adv


def game_metrics(game: dict, advantages: torch.Tensor) -> dict:
    """Teacher and student mean scores per segment and the drift gap (teacher - student)."""
    with torch.no_grad():
        valid = game["format_ok"]
        sc, st = game["student_caption"].detach().cpu(), game["student_think"].detach().cpu()
        mean_valid = lambda x: float(x[valid].mean()) if bool(valid.any()) else float("nan")  # noqa: E731
        tc, tt = float(game["teacher_caption"].detach().mean()), float(game["teacher_think"].detach().mean())
        return {
            "score/teacher_caption": tc, "score/teacher_think": tt,
            "score/student_caption": mean_valid(sc), "score/student_think": mean_valid(st),
            "gap/caption": tc - float(sc.mean()), "gap/think": tt - float(st.mean()),
            "format/valid": float(valid.float().mean()), "acc/mean": float(game["acc"].mean()),
            "advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()) if
            advantages.numel() > 1 else 0.0, "advantage/min": float(advantages.min()),
            "advantage/max": float(advantages.max()), "d/tokens": game["tokens"],
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


def print_plan(cfg: AlignConfig, policy_spec, disc_source, n_samples: int) -> None:
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
                 f"advantages {cfg.advantage_mode}; scoring layout {cfg.disc_layout}"],
        ["optimizers", f"policy lr {cfg.lr} constant, discriminator lr {cfg.disc_lr}, wd {cfg.weight_decay}"],
        ["device", str(default_device())],
        ["output", cfg.out or "(--out not set)"],
    ]
    console.print_table("prism align --dry-run", ["", "plan"], rows)
    plan_report.print_plan("prism align", plan_report.align_plan(cfg, shape, disc_shape, vllm_sleeps=True))
    return None
