"""prism rl end to end on the tiny model after SFT: each algorithm raises the verifiable reward.

RL starts from a short SFT (100 steps) whose samples are format-valid only a quarter of the time, so
the reward has room to rise within a few steps (after a long SFT the tiny model sits near its accuracy
ceiling and 12 RL steps move the reward by less than its sampling noise). The claim is checked on a
paired measurement, the same training prompts sampled with the same seeds before and after the run;
the per-step training reward is printed."""

import json

import pytest

from stages.common.data.chat import rollout_prompt
from stages.common.models.loading import load_policy, load_processor
from stages.common.rewards import compute_score
from stages.common.rollout import SamplingParams, make_engine
from stages.common.world import synth
from stages.rl.config import RLConfig
from stages.rl.run import run
from tests.conftest import LEARNING_SEED, free_port, run_stage

TRAIN = "synth:train:256"


def sampled_reward(ckpt, samples, n=8) -> float:
    """Mean reward of n samples per prompt at temperature 1 with a fixed seed."""
    model, processor = load_policy(ckpt, train=False), load_processor(ckpt)
    engine = make_engine("hf", model, processor)
    outs = engine.generate([rollout_prompt(s) for s in samples],
                           SamplingParams(n=n, temperature=1.0, max_new_tokens=96, seed=1234))
    scores = [compute_score(c.text, s.answer, s.choices)["score"] for s, group in zip(samples, outs) for c in group]
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def probe_prompts():
    return synth.load(TRAIN, seed=0)[:96]


@pytest.fixture(scope="module")
def sft_partial(tmp_path_factory):
    """A partly trained SFT policy (100 steps, not the session's 200-step sft_tiny): RL needs headroom. With
    sft_tiny, dapo's paired reward moved 0.395 -> 0.396 (grpo 0.395 -> 0.459), below this test's +0.02 bar."""
    from stages.sft.config import SFTConfig
    from stages.sft.run import run as sft

    return run_stage(SFTConfig, sft, ckpt="tiny", data=["synth:train:1024"],
                     out=str(tmp_path_factory.mktemp("rl") / "sft"), lr=3e-3, batch_size=16, micro_batch_size=8,
                     max_steps=100, warmup=0.05, eval_fraction=0, save_every=1000, seed=LEARNING_SEED)


@pytest.fixture(scope="module")
def reward_before(sft_partial, probe_prompts):
    return sampled_reward(str(sft_partial / "model"), probe_prompts)


@pytest.mark.learning
@pytest.mark.parametrize("algo", ["grpo", "dapo", "gspo"])
def test_rl_raises_reward(algo, sft_partial, probe_prompts, reward_before, tmp_path, record_learning):
    # The bar and the run are sized by the spread measured across seeds and CPU kernel paths (issue 37: at 12
    # steps, lr 2e-4 and a 32-prompt probe, gspo rose +0.0195 on an AVX512 machine against a +0.02 bar; the same
    # setting gave +0.0195 to +0.101 over 7 runs). At 16 steps, lr 4e-4, on 96 prompts x 8 samples, 9 runs (grpo /
    # dapo / gspo, seeds 0-1 with AVX512 kernels, seed 0 with ATEN_CPU_CAPABILITY=default, whose SFT start itself
    # differs: 0.234 vs 0.224 before RL) rose +0.050 to +0.123, mean +0.078, sd 0.021. The bar, +0.025, sits
    # 2.5 sd under that mean; the probe's own noise on a paired difference is about 0.015, so a run that learns
    # nothing clears it rarely. The exact check that each update follows its surrogate's gradient, on any
    # machine, is test_one_update_lowers_the_algorithms_own_surrogate.
    out = run_stage(RLConfig, run, algo=algo, ckpt=str(sft_partial), data=[TRAIN], out=str(tmp_path / algo),
                    steps=16, prompts_per_step=16, rollouts_per_prompt=8, max_new_tokens=96, lr=4e-4, warmup=1,
                    overlong_buffer=16, max_num_gen_batches=3, seed=LEARNING_SEED)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    after = sampled_reward(str(out / "model"), probe_prompts)
    curve = [round(r["reward/mean"], 3) for r in records]
    print(f"\n{algo}: paired reward on {len(probe_prompts)} training prompts x 8: {reward_before:.3f} -> {after:.3f}; "
          f"per-step training reward {curve}")
    assert len(records) == 16
    # Paired: the same prompts and seeds before and after. The per-step curve is printed, not asserted:
    # each step draws different prompts, whose difficulty varies more than 12 steps move the mean (gspo
    # failed a last-4 > first-4 check on one trajectory while its paired reward rose 0.087 -> 0.141).
    record_learning("paired reward gain", after - reward_before, 0.025)
    assert after > reward_before + 0.025
    summary = json.loads((out / "prism.json").read_text())["summary"]
    assert summary["steps"] == 16 and (out / "reward.png").stat().st_size > 1000
    kept = [r["sampling/groups_kept"] for r in records]
    drawn = [r["sampling/groups_drawn"] for r in records]
    if algo == "dapo":  # dynamic sampling dropped groups whose accuracy was all equal, and drew more to refill
        assert sum(kept) < sum(drawn), (kept, drawn)
        assert max(r["sampling/gen_batches"] for r in records) > 1
    else:  # without it every drawn group trains
        assert kept == drawn


@pytest.mark.parametrize("algo", ["grpo", "dapo", "gspo"])
def test_one_update_lowers_the_algorithms_own_surrogate(algo, sft_partial, probe_prompts):
    """Trajectory-free, so it holds on any machine: one small SGD step of the rl stage's update (ppo_update with
    the algorithm's own loss, clip range and aggregation) lowers that surrogate on the same rollouts, by about
    lr x |g|^2 (first order). The step is small enough that no sequence leaves GSPO's 3e-4 clip band, where
    the pessimistic bound would stop counting the gains. A sign error in a loss, an aggregation that drops rows
    or an update that steps the wrong parameters fails here whatever the CPU's kernels."""
    import torch

    from stages.common.contract import config
    from stages.common.policy_update.logprobs import build_policy_batch, response_logprobs
    from stages.common.policy_update.ppo import ppo_update
    from stages.common.training import runtime as training
    from stages.rl.run import ppo_settings

    settings = ppo_settings(config.resolve(RLConfig, flags=dict(algo=algo, ckpt="tiny", out="unused")))
    processor = load_processor(str(sft_partial / "model"))
    prompts = [rollout_prompt(s) for s in probe_prompts[:4]]
    sampler = load_policy(str(sft_partial / "model"), train=False)
    groups = make_engine("hf", sampler, processor).generate(prompts, SamplingParams(n=4, max_new_tokens=32, seed=3))
    completions = [c for group in groups for c in group]
    prompt_index = [p for p in range(len(prompts)) for _ in range(4)]
    advantages = torch.linspace(-1.5, 1.5, len(completions))
    batch = build_policy_batch(processor, prompts, [c.token_ids for c in completions], prompt_index)
    mask = batch["response_mask"]

    runtime = training.make_runtime()
    # 1e-5: the surrogate falls by 4e-6 to 1.3e-5 (hundreds of times float32's rounding of it, ~1e-8) while the
    # largest sequence log-ratio stays under 1e-4, inside GSPO's 3e-4 band. Measured with two SFT starts (AVX512
    # and default kernels): at 3e-5 they fell 1.153e-05 / 3.795e-05 against 1.154e-05 / 3.791e-05 predicted,
    # but the second start's largest log-ratio reached 2.77e-4, too near the band.
    lr = 1e-5
    policy = runtime.prepare(load_policy(str(sft_partial / "model")),
                             lambda m: torch.optim.SGD(m.parameters(), lr=lr),
                             lambda opt: training.build_scheduler(opt, "constant", 0, 1))

    def logprobs():
        with torch.no_grad():
            return response_logprobs(policy.model, batch, temperature=settings.temperature, shared_prefix=False)[0]

    def surrogate(logp, old):
        return float(settings.loss(logp, old, advantages, mask, clip_low=settings.clip_low,
                                   clip_high=settings.clip_high, agg=settings.agg)[0])

    old = logprobs()
    before = surrogate(old, old)
    stats = ppo_update(settings, runtime.accelerator, policy, processor, prompts, completions, prompt_index,
                       advantages)
    after_logp = logprobs()
    after = surrogate(after_logp, old)
    grad_norm = stats["update/grad_norm"]
    predicted = lr * grad_norm ** 2 * min(1.0, settings.max_grad_norm / grad_norm)  # the clipped step's |g| x |step|
    seq_ratio = ((after_logp - old) * mask).sum(1) / mask.sum(1)
    print(f"\n{algo}: surrogate {before:.8f} -> {after:.8f} (fell {before - after:.3e}, first order predicts "
          f"{predicted:.3e}); largest |sequence log-ratio| {seq_ratio.abs().max():.2e}")
    assert seq_ratio.abs().max() < settings.clip_low  # inside every algorithm's clip band, GSPO's included
    assert before - after > 0
    assert 0.5 * predicted < before - after < 1.5 * predicted  # the step was the surrogate's own gradient


def test_rl_kl_penalty_loads_a_reference_and_reports_kl(sft_partial, tmp_path):
    out = run_stage(RLConfig, run, algo="grpo", ckpt=str(sft_partial), data=[TRAIN], out=str(tmp_path / "kl"),
                    steps=3, prompts_per_step=4, rollouts_per_prompt=8, max_new_tokens=64, lr=1e-3, warmup=1,
                    kl_coef=0.1, seed=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("update/kl" in r for r in records)
    assert records[0]["update/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before the 1st update
    moved = [r["update/kl"] for r in records[1:]]
    assert max(moved) > 1e-6, moved  # once the policy has taken a step it drifts from the reference


def test_rl_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from stages.common.contract import config
    cfg = config.resolve(RLConfig, flags=dict(algo="gspo", ckpt="tiny", out=str(tmp_path / "x"), dry_run=True))
    assert run(cfg) is None
    text = capsys.readouterr().out
    assert "gspo" in text and "0.0003/0.0004" in text and "seq-mean-token-mean" in text
    assert not (tmp_path / "x").exists()


def test_ppo_update_same_weights_with_and_without_shared_prefix(sft_partial, probe_prompts):
    """One clipped update from the same rollouts: running each prompt once (shared prefix) or per row gives
    the same step (micro-batched differently too: a small token budget splits the groups). SGD with lr 1,
    so the weight change is the clipped gradient itself (Adam's first step would amplify float noise in
    near-zero gradients to +-lr)."""
    import torch

    from stages.common.policy_update.ppo import PPOSettings, ppo_update
    from stages.common.training import runtime as training

    processor = load_processor(str(sft_partial / "model"))
    prompts = [rollout_prompt(s) for s in probe_prompts[:3]]
    seed_model = load_policy(str(sft_partial / "model"), train=False)
    groups = make_engine("hf", seed_model, processor).generate(prompts, SamplingParams(n=4, max_new_tokens=24,
                                                                                       seed=7))
    completions = [c for group in groups for c in group]
    advantages = torch.linspace(-1.5, 1.5, len(completions))
    weights = []
    for shared, budget in ((False, 16384), (True, 16384), (True, 300)):
        runtime = training.make_runtime()
        policy = runtime.prepare(load_policy(str(sft_partial / "model")),
                                 lambda m: torch.optim.SGD(m.parameters(), lr=1.0),
                                 lambda opt: training.build_scheduler(opt, "constant", 0, 1))
        model = policy.module
        settings = PPOSettings(micro_batch_tokens=budget, shared_prefix=shared, clip_high=0.28)
        stats = ppo_update(settings, runtime.accelerator, policy, processor, prompts, completions,
                           [p for p in range(3) for _ in range(4)], advantages)
        assert stats["update/grad_norm"] > 0
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = {n: p.detach() for n, p in load_policy(str(sft_partial / "model")).named_parameters()}
    steps = [{n: w[n] - start[n] for n in start} for w in weights]
    assert sum(int((d != 0).any()) for d in steps[0].values()) > 50          # the update moved most tensors
    for other in steps[1:]:
        for name, delta in steps[0].items():
            torch.testing.assert_close(other[name], delta, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.dist
def test_two_process_ddp_rl_keeps_replicas_identical(sft_partial, tmp_path):
    """Two CPU processes (gloo): the shared-prefix update runs the prompt pass outside the DDP wrapper;
    gradients from both passes must still be all-reduced, or the replicas drift (the run raises)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PRISM_NO_PROGRESS="1", ACCELERATE_USE_CPU="1")
    env.pop("RANK", None)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "prism_cli", "rl", "--algo", "grpo", "--ckpt", str(sft_partial),
           "--data", TRAIN, "--steps", "2", "--prompts-per-step", "4", "--rollouts-per-prompt", "4",
           "--max-new-tokens", "16", "--lr", "1e-3", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "prism.json").read_text())["summary"]
    sums = summary["replica_weight_sums"]
    assert summary["processes"] == 2 and len(sums) == 2 and sums[0] == sums[1]
    before = sum(float(p.detach().double().sum()) for p in load_policy(str(sft_partial / "model")).parameters())
    assert abs(sums[0] - before) > 1e-6       # the update did move the weights
