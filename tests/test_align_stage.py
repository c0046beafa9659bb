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
from tests.conftest import run_stage

DATA = "synth:train:256"


@pytest.fixture(scope="module")
def noisy_policy(sft_tiny, tmp_path_factory):
    """The SFT policy fine-tuned further on noisy oracle demonstrations (wrong caption items and reasoning
    slips at high rates), standing in for a policy trained on lower-fidelity public data."""
    root = tmp_path_factory.mktemp("noisy")
    demos = run_stage(CurateConfig, curate, source=["synth:train:512"], teacher="oracle-noisy", gate="none",
                      caption_error_rate=0.6, reasoning_slip_rate=0.6, out=str(root / "curated"))
    return run_stage(SFTConfig, sft, ckpt=str(sft_tiny), data=[str(demos)], out=str(root / "sft-noisy"), lr=1e-3,
                     batch_size=16, micro_batch_size=8, max_steps=40, warmup=0.05, eval_fraction=0, seed=0)


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
def test_alignment_shrinks_the_in_run_gap_and_keeps_the_format(noisy_policy, tmp_path):
    out = run_stage(AlignConfig, align, ckpt=str(noisy_policy), data=[DATA], out=str(tmp_path / "align"),
                    steps=16, prompts_per_step=4, rollouts_per_prompt=8, max_new_tokens=96, lr=2e-5,
                    disc_lr=1e-4, warmup_steps=150, warmup_prompts=256, warmup_batch=8, warmup_lr=1e-3, seed=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "prism.json").read_text())["summary"]
    game = [r for r in records if "gap/caption" in r]
    assert len(game) == 16
    for key in ("d/loss", "d/acc_caption", "d/acc_think", "score/teacher_caption", "score/student_think",
                "gap/caption", "gap/think", "format/valid", "advantage/mean", "time/rollout", "time/score"):
        assert key in game[0], key
    assert (out / "discriminator" / "config.json").is_file() and (out / "drift_gap.png").stat().st_size > 1000
    # The warmup fit its pairs: the pairwise loss fell and training accuracy ended above chance. Held-out
    # accuracy is reported, not asserted: on this run's 26 held-out pairs it went caption 0.50 -> 0.31, think
    # 0.31 -> 0.42 (2026-12-01), while training accuracy rose 0.54 -> 0.66: the tiny warmup does not generalise.
    warm = [r for r in records if r.get("phase") == "warmup"]
    quarter = max(len(warm) // 4, 1)
    first, last = warm[:quarter], warm[-quarter:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "warmup/loss") < mean(first, "warmup/loss")
    assert mean(last, "warmup/acc_caption") > 0.55 and mean(last, "warmup/acc_think") > 0.55
    assert summary["warmup/pairs"] > 0 and "warmup/heldout_acc_caption" in summary

    # The game's own measure: the gap (teacher minus policy score) under the co-trained discriminator
    # falls over the run, for both segments (half against half: one step scores only 4 prompts).
    half = len(game) // 2
    for seg in ("caption", "think"):
        first = sum(r[f"gap/{seg}"] for r in game[:half]) / half
        last = sum(r[f"gap/{seg}"] for r in game[half:]) / (len(game) - half)
        print(f"\nalign: in-run {seg} gap, first half {first:.3f} -> second half {last:.3f}")
        assert last < first, seg

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
    assert after["valid"] >= 0.8


def test_text_only_and_dense_discriminator_ablations_run(sft_tiny, tmp_path):
    for name, flags in {"dense": dict(disc_dense=True), "text": dict(disc_text_only=True)}.items():
        out = run_stage(AlignConfig, align, ckpt=str(sft_tiny), data=["synth:train:32"], out=str(tmp_path / name),
                        steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=32, warmup_steps=1,
                        warmup_prompts=4, warmup_batch=2, seed=0, **flags)
        config = json.loads((out / "discriminator" / "config.json").read_text())
        variant = config["prism_discriminator"]
        assert variant["text_only"] is (name == "text")
        assert ("moe" in config["model_type"]) is (name != "dense")
