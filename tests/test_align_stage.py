"""prism align end to end on the tiny models: from a policy SFT'd on noisy demonstrations toward the
oracle's, the gap under the co-trained discriminator shrinks per segment over the run and the format
stays valid."""

import json

import pytest
import torch

from stages.align.config import AlignConfig
from stages.align.run import run as align
from stages.align.scoring import score_groups
from stages.common.data.chat import rollout_prompt
from stages.common.models.discriminator import load_discriminator, load_discriminator_processor
from stages.common.models.loading import load_policy, load_processor
from stages.common.protocol import parse_response
from stages.common.rollout import SamplingParams, make_engine
from stages.common.world import synth
from stages.curate.config import CurateConfig
from stages.curate.run import run as curate
from stages.sft.config import SFTConfig
from stages.sft.run import run as sft
from tests.conftest import LEARNING_SEED, run_stage

DATA = "synth:train:256"


@pytest.fixture(scope="module")
def noisy_policy(sft_tiny, tmp_path_factory):
    """The SFT policy fine-tuned further on noisy oracle demonstrations (wrong caption items and reasoning
    slips at high rates), standing in for a policy trained on lower-fidelity public data."""
    root = tmp_path_factory.mktemp("noisy")
    demos = run_stage(CurateConfig, curate, source=["synth:train:512"], teacher="oracle-noisy", gate="none",
                      caption_error_rate=0.6, reasoning_slip_rate=0.6, out=str(root / "curated"))
    return run_stage(SFTConfig, sft, ckpt=str(sft_tiny), data=[str(demos)], out=str(root / "sft-noisy"), lr=1e-3,
                     batch_size=16, micro_batch_size=8, max_steps=40, warmup=0.05, eval_fraction=0,
                     seed=LEARNING_SEED)


def drift_gaps(policy_path, disc, disc_processor, samples, n=4) -> dict:
    """Mean teacher-minus-student score per segment under one fixed discriminator, over n samples per
    prompt (seeded), format-valid samples only; plus the format-valid ratio."""
    model, processor = load_policy(policy_path, train=False), load_processor(policy_path)
    prompts = [rollout_prompt(s) for s in samples]
    outs = make_engine("hf", model, processor).generate(prompts, SamplingParams(n=n, temperature=1.0,
                                                                                max_new_tokens=96, seed=77))
    gaps = {"caption": [], "think": []}
    valid = 0
    with torch.no_grad():
        for s, prompt, group in zip(samples, prompts, outs):
            parsed = [parse_response(c.text) for c in group]
            ok = [p for p in parsed if p.format_ok]
            valid += len(ok)
            if not ok:
                continue
            segs = [s.teacher.caption, s.teacher.think] + [p.caption for p in ok] + [p.think for p in ok]
            scores = score_groups(disc, disc_processor, [prompt], [segs]).scores[0]
            k = len(ok)
            gaps["caption"] += (scores[0] - scores[2:2 + k]).tolist()
            gaps["think"] += (scores[1] - scores[2 + k:]).tolist()
    return {"caption": sum(gaps["caption"]) / max(len(gaps["caption"]), 1),
            "think": sum(gaps["think"]) / max(len(gaps["think"]), 1), "valid": valid / (n * len(samples))}


@pytest.mark.learning
def test_alignment_plays_the_game_and_keeps_the_format(noisy_policy, tmp_path, record_learning):
    """The game end to end: warmup, 16 steps, the discriminator saved, the format kept. What each player's
    update does is checked exactly elsewhere (see the comments below); this run's trajectory statistics are
    recorded for benchmarks/learning_spread.py and asserted only where their margin is large."""
    out = run_stage(AlignConfig, align, ckpt=str(noisy_policy), data=[DATA], out=str(tmp_path / "align"),
                    steps=16, prompts_per_step=4, rollouts_per_prompt=8, max_new_tokens=96, lr=2e-5,
                    disc_lr=1e-4, warmup_steps=150, warmup_prompts=256, warmup_batch=8, warmup_lr=1e-3,
                    seed=LEARNING_SEED)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "prism.json").read_text())["summary"]
    game = [r for r in records if "gap/caption" in r]
    assert len(game) == 16
    for key in ("d/loss", "d/acc_caption", "d/acc_think", "score/teacher_caption", "score/student_think",
                "gap/caption", "gap/think", "format/valid", "advantage/mean", "time/rollout", "time/score"):
        assert key in game[0], key
    assert (out / "discriminator" / "config.json").is_file() and (out / "drift_gap.png").stat().st_size > 1000
    # The warmup's own statistics are recorded, not asserted: over 7 runs (seeds 0-3; AVX512, AVX2, default) its
    # loss fell by 0.04-0.28 (first quarter against the last; mean 0.17, sd 0.09) and its training accuracy ended
    # at 0.60-0.76 (mean 0.66-0.68, sd 0.05), 1.9-2.8 sd from their old bars (0 and 0.55): too near for a verdict
    # that holds on any machine (issue 37, benchmarks/results/learning-spread.md). That the warmup learns to rank
    # is test_warmup_learns_to_rank_teacher_above_corrupted_student's claim (test_scoring.py, bar 0.8 against a
    # measured 0.90-0.97); held-out accuracy on this run's 26 pairs does not generalise on the tiny model
    # (caption 0.50 -> 0.31, 2026-12-01) and is only reported.
    warm = [r for r in records if r.get("phase") == "warmup"]
    quarter = max(len(warm) // 4, 1)
    first, last = warm[:quarter], warm[-quarter:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    record_learning("warmup loss fall, reported (first quarter - last)",
                    mean(first, "warmup/loss") - mean(last, "warmup/loss"), 0.0)
    record_learning("warmup training accuracy, caption, reported", mean(last, "warmup/acc_caption"), 0.55)
    record_learning("warmup training accuracy, think, reported", mean(last, "warmup/acc_think"), 0.55)
    assert summary["warmup/pairs"] > 0 and "warmup/heldout_acc_caption" in summary

    # Reported, not asserted: the gap (teacher minus policy score) under the co-trained discriminator, first
    # half of the run against the second. It used to be asserted to fall; measured across seeds it does not
    # hold (issue 37: the caption gap's fall ranged -0.285 to +0.236 over 7 runs, mean 0.05), because the judge moves
    # with the policy and one step scores only 4 prompts. What each player's update does is checked exactly,
    # on any machine, by test_one_discriminator_update_lowers_its_own_objective (the judge) and
    # test_one_update_lowers_the_algorithms_own_surrogate in test_rl_stage.py (the shared policy update).
    half = len(game) // 2
    for seg in ("caption", "think"):
        first = sum(r[f"gap/{seg}"] for r in game[:half]) / half
        last = sum(r[f"gap/{seg}"] for r in game[half:]) / (len(game) - half)
        print(f"\nalign: in-run {seg} gap, first half {first:.3f} -> second half {last:.3f}")
        record_learning(f"in-run {seg} gap fall, reported (first half - second half)", first - last, 0.0)

    # Reported, not asserted: the same (final) discriminator judging samples from the policy before and
    # after. On the tiny model this 16-step run does not move it beyond its noise: with 24 prompts x 4
    # samples the sign of the change flipped when only the rollout sampler's float rounding changed, and a
    # 64 x 8 probe measured caption 0.168 -> 0.187, think 0.478 -> 0.491 (2026-11-22).
    disc = load_discriminator(out / "discriminator")
    disc_processor = load_discriminator_processor(out / "discriminator")
    probe = synth.with_oracle_demos(synth.load("synth:train:256", seed=0)[:24])
    before = drift_gaps(str(noisy_policy), disc, disc_processor, probe)
    after = drift_gaps(str(out), disc, disc_processor, probe)
    print(f"align: drift gap under the final discriminator, before -> after: caption "
          f"{before['caption']:.3f} -> {after['caption']:.3f}, think {before['think']:.3f} -> {after['think']:.3f}; "
          f"format valid {before['valid']:.2f} -> {after['valid']:.2f}; in-run summary {summary}")
    record_learning("format valid after", after["valid"], 0.8)
    assert after["valid"] >= 0.8   # measured 0.93-0.99 over 5 runs, seeds and kernel paths (7 sd; issue 37)


@pytest.mark.parametrize("layout", ["prefix", "shared"])
def test_one_discriminator_update_lowers_its_own_objective(sft_tiny, layout):
    """Trajectory-free, so it holds on any machine: one small SGD step of align's discriminator update
    (score_rollouts, then discriminator_update: Bradley-Terry per segment + score L2 + the router's aux loss,
    backpropagated through the chunked scoring's replay) lowers that objective on the same rollouts by about
    lr x |g|^2 (first order). A sign error in the objective, a chunk whose replay drops its gradient or an
    update that steps the wrong parameters fails here whatever the CPU's kernels."""
    from stages.align.objective import discriminator_objective
    from stages.align.run import discriminator_update, score_rollouts
    from stages.common.contract import config
    from stages.common.models.discriminator import aux_loss_coef, upcycle
    from stages.common.training import runtime as training

    # disc_row_tokens 256: a group splits over several rows and chunks, so the replay path is what runs
    cfg = config.resolve(AlignConfig, flags=dict(ckpt="tiny", data=[DATA], out="unused"),
                         sets=["disc_row_tokens=256", f"disc_layout={layout}", "disc_gradient_checkpointing=off"])
    samples = synth.with_oracle_demos(synth.load(DATA, seed=0)[:3])
    batch = [(s, rollout_prompt(s)) for s in samples]
    policy_path = str(sft_tiny / "model")
    completions = make_engine("hf", load_policy(policy_path, train=False), load_processor(policy_path)).generate(
        [p for _, p in batch], SamplingParams(n=4, temperature=1.0, max_new_tokens=96, seed=11))
    # 1e-4: measured falls are ~1e-4 of an objective ~1.4 (float32 rounds it at ~1e-7)
    lr = 1e-4
    runtime = training.make_runtime()
    disc = runtime.prepare(upcycle("tiny", seed=0), lambda m: torch.optim.SGD(m.parameters(), lr=lr),
                           lambda opt: training.build_scheduler(opt, "constant", 0, 1), name="discriminator")
    disc_processor = load_processor("tiny")

    def objective() -> float:
        with torch.no_grad():
            scores, _, _ = score_rollouts(cfg, disc, disc_processor, batch, completions)
            return float(discriminator_objective(scores, score_reg=cfg.score_reg, clip=cfg.score_clip,
                                                 aux_coef=aux_loss_coef(disc.module)).loss)

    before = objective()
    scores, _, scored = score_rollouts(cfg, disc, disc_processor, batch, completions)
    assert scored.num_chunks > 1 and int(scores.format_ok.sum()) > 0
    grad_norm = discriminator_update(cfg, disc, scores, scored)["d/grad_norm"]
    after = objective()
    predicted = lr * grad_norm ** 2 * min(1.0, cfg.max_grad_norm / grad_norm)
    print(f"\ndiscriminator objective {before:.7f} -> {after:.7f} (fell {before - after:.3e}, first order predicts "
          f"{predicted:.3e}); {scored.num_chunks} chunks, {int(scores.format_ok.sum())} format-valid rollouts")
    assert before - after > 0
    assert 0.5 * predicted < before - after < 1.5 * predicted


def test_text_only_and_dense_discriminator_ablations_run(sft_tiny, tmp_path):
    for name, flags in {"dense": dict(disc_dense=True), "text": dict(disc_text_only=True)}.items():
        out = run_stage(AlignConfig, align, ckpt=str(sft_tiny), data=["synth:train:32"], out=str(tmp_path / name),
                        steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=32, warmup_steps=1,
                        warmup_prompts=4, warmup_batch=2, seed=0, **flags)
        config = json.loads((out / "discriminator" / "config.json").read_text())
        variant = config["prism_discriminator"]
        assert variant["text_only"] is (name == "text")
        assert ("moe" in config["model_type"]) is (name != "dense")
