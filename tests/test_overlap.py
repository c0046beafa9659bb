"""--overlap 1: each step's first rollout batch is generated in a worker thread while the previous step updates
(stages.common.rollout.ahead), one step off-policy and corrected per token by truncated importance sampling.

- the ahead piece on a toy engine: the worker samples the snapshot taken at submit, whatever the trainer does
  to its weights meanwhile; a batch taken under another key, or a worker that failed, raises;
- the same code path at lag 0 (the snapshot refreshed and the batch generated right before it is needed) is
  bit for bit the synchronous path, for rl and for align: the same metrics and the same final weights;
- at lag 1 the metrics show it: policy lag 1 from step 2, a rollout-trainer gap far above step 1's float
  noise, TIS weights; a resumed run redraws the batch that was in flight;
- the options it cannot run with are refused in one line.
"""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

import stages.align.run as align_run
import stages.rl.run as rl_run
from stages.align.config import AlignConfig
from stages.common.contract import config
from stages.common.contract.errors import UsageError
from stages.common.rollout.ahead import RolloutsAhead
from stages.common.rollout.base import Completion, RolloutPrompt, SamplingParams
from stages.rl.config import RLConfig
from tests.conftest import interrupt_at_call, run_stage


def spread_reward(response, sample):
    """A reward that differs between the samples of a group (the untrained tiny model earns 0 from the protocol
    reward on every rollout, so nothing would be learnt): every advantage is nonzero and the weights move."""
    return (sum(map(ord, response)) % 101) / 100


def half_decided(response, sample):
    """spread_reward, with the accuracy of every other problem the same on all its samples: DAPO's dynamic
    sampling drops those groups and draws refill batches."""
    decided = sum(map(ord, sample.id)) % 2 == 0
    return {"score": spread_reward(response, sample), "acc": 1.0 if decided else spread_reward(response, sample)}


REWARD = "tests.test_overlap:spread_reward"
RL_TINY = dict(algo="grpo", ckpt="tiny", data=["synth:train:64"], prompts_per_step=2, rollouts_per_prompt=4,
               max_new_tokens=12, lr=1e-3, warmup=0, tis_cap=2.0, reward=REWARD, seed=0)
ALIGN_TINY = dict(ckpt="tiny", data=["synth:train:16"], prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=12,
                  warmup_steps=1, warmup_prompts=2, warmup_batch=2, lr=1e-3, disc_lr=1e-3, tis_cap=2.0, seed=0)


def _records(out, key="step"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get(key, 0) > 0]


def _untimed(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


# ------------------------------------------------------------------------------------------- the ahead piece

class ToyEngine:
    """Samples one "completion" per prompt whose text is the sum of the model's weights; generate can be held
    at a gate so a test acts on the trainer while the worker is mid-batch."""

    name = "toy"

    def __init__(self, model):
        self.model, self.processor, self.lockstep = model, None, None
        self.entered, self.gate = threading.Event(), threading.Event()
        self.gate.set()

    def sync_weights(self, model):
        self.model = model

    def generate(self, prompts, params):
        self.entered.set()
        assert self.gate.wait(30)
        value = float(self.model.weight.detach().sum())
        return [[Completion(token_ids=[], text=f"{value:g}", logprobs=[], finish_reason="stop")] for _ in prompts]


PROMPTS = [RolloutPrompt(messages=[{"role": "user", "content": "q"}])]
PARAMS = SamplingParams(n=1, seed=3)


def test_the_worker_samples_the_snapshot_taken_at_submit():
    trainer = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.ones_(trainer.weight)                          # sum 4
    engine = ToyEngine(trainer)
    ahead = RolloutsAhead(engine, trainer, lag=1)
    assert ahead.snapshot is not trainer and engine.model is trainer   # the stage's engine keeps the live module

    engine.gate.clear()
    ahead.submit((1, 0), PROMPTS, PARAMS, trainer)
    assert engine.entered.wait(30)                               # the worker is mid-batch ...
    with torch.no_grad():
        trainer.weight.add_(1.0)                                 # ... while the update changes the weights in place
    engine.gate.set()
    (completion,), = ahead.take((1, 0), PROMPTS, PARAMS, trainer)
    assert completion.text == "4"                                # theta at submit, not the updated 8
    assert ahead.metrics()["rollout/policy_lag"] == 1

    ahead.submit((2, 2), PROMPTS, PARAMS, trainer)               # the next submit refreshes the snapshot
    (completion,), = ahead.take((2, 2), PROMPTS, PARAMS, trainer)
    assert completion.text == "8"


def test_lag_zero_samples_the_weights_at_take():
    trainer = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.ones_(trainer.weight)
    for snapshot in (True, False):
        ahead = RolloutsAhead(ToyEngine(trainer), trainer, lag=0, snapshot=snapshot)
        ahead.submit((1, 0), PROMPTS, PARAMS, trainer)
        with torch.no_grad():
            trainer.weight.add_(1.0)
        (completion,), = ahead.take((1, 0), PROMPTS, PARAMS, trainer)
        assert completion.text == f"{float(trainer.weight.detach().sum()):g}"
        assert ahead.metrics()["rollout/policy_lag"] == 0
        # nothing submitted (the first step, the first after a resume): generated now, at lag 0
        (completion,), = ahead.take((2, 0), PROMPTS, PARAMS, trainer)
        assert completion.text == f"{float(trainer.weight.detach().sum()):g}"


def test_a_batch_taken_under_another_key_or_a_failed_worker_raises():
    trainer = torch.nn.Linear(2, 2, bias=False)
    ahead = RolloutsAhead(ToyEngine(trainer), trainer, lag=1)
    ahead.submit((1, 0), PROMPTS, PARAMS, trainer)
    with pytest.raises(RuntimeError, match=r"generated ahead was \(1, 0\), this step needs \(1, 4\)"):
        ahead.take((1, 4), PROMPTS, PARAMS, trainer)
    ahead.submit((1, 0), PROMPTS, PARAMS, trainer)
    with pytest.raises(RuntimeError, match="never taken"):
        ahead.submit((2, 0), PROMPTS, PARAMS, trainer)
    ahead.close()

    def broken(prompts, params):
        raise ValueError("out of memory, say")

    ahead.mirror.generate = broken
    ahead.submit((3, 0), PROMPTS, PARAMS, trainer)
    with pytest.raises(ValueError, match="out of memory"):
        ahead.take((3, 0), PROMPTS, PARAMS, trainer)


def test_the_worker_runs_the_main_threads_number_of_torch_threads():
    """torch's intra-op thread count is process-wide: the worker runs the kernels the main thread would (what the
    bit-for-bit tests below rely on)."""
    seen = []

    class Counting(ToyEngine):
        def generate(self, prompts, params):
            seen.append(torch.get_num_threads())
            return super().generate(prompts, params)

    trainer = torch.nn.Linear(2, 2, bias=False)
    ahead = RolloutsAhead(Counting(trainer), trainer, lag=1)
    ahead.submit((1, 0), PROMPTS, PARAMS, trainer)
    ahead.take((1, 0), PROMPTS, PARAMS, trainer)
    assert seen == [torch.get_num_threads()]


# ------------------------------------------------------------------------------------------- lag 0 == synchronous

def _forced_lag_zero(monkeypatch, module):
    """The overlap code path (snapshot copy, worker thread, the next batch chosen ahead) with the submission held
    until the batch is needed: lag 0."""
    monkeypatch.setattr(module, "RolloutsAhead", lambda engine, live, lag: RolloutsAhead(engine, live, lag=0,
                                                                                          snapshot=True))


def test_rl_lag_zero_through_the_overlap_path_is_the_synchronous_run_bit_for_bit(tmp_path, monkeypatch):
    sync = run_stage(RLConfig, rl_run.run, out=str(tmp_path / "sync"), steps=3, overlap=0, **RL_TINY)
    _forced_lag_zero(monkeypatch, rl_run)
    ahead = run_stage(RLConfig, rl_run.run, out=str(tmp_path / "ahead"), steps=3, overlap=1, **RL_TINY)
    assert "time/rollout_wait" in _records(ahead)[0]              # the worker path really ran
    assert _untimed(_records(ahead)) == _untimed(_records(sync))
    assert [r["rollout/policy_lag"] for r in _records(ahead)] == [0, 0, 0]
    assert _records(sync)[-1]["update/grad_norm"] > 0             # the weights moved: the comparison has teeth
    a, s = _weights(ahead), _weights(sync)
    assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in s)


def test_align_lag_zero_through_the_overlap_path_is_the_synchronous_run_bit_for_bit(tmp_path, monkeypatch):
    sync = run_stage(AlignConfig, align_run.run, out=str(tmp_path / "sync"), steps=2, overlap=0, **ALIGN_TINY)
    _forced_lag_zero(monkeypatch, align_run)
    ahead = run_stage(AlignConfig, align_run.run, out=str(tmp_path / "ahead"), steps=2, overlap=1, **ALIGN_TINY)
    game = lambda out: [r for r in _records(out) if "gap/caption" in r]  # noqa: E731
    assert len(game(sync)) == 2 and "time/rollout_wait" in game(ahead)[0]
    assert _untimed(game(ahead)) == _untimed(game(sync))
    a, s = _weights(ahead), _weights(sync)
    assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in s)
    assert any(not torch.equal(s[k], w) for k, w in load_file(str(_tiny_weights())).items() if k in s)


def _tiny_weights():
    from stages.common.world import tiny
    return tiny.ensure("tiny") / "model.safetensors"


# ------------------------------------------------------------------------------------------- lag 1

def test_rl_overlap_one_trains_one_step_off_policy_with_tis(tmp_path):
    out = run_stage(RLConfig, rl_run.run, out=str(tmp_path / "rl"), steps=3, overlap=1, **RL_TINY)
    records = _records(out)
    assert [r["rollout/policy_lag"] for r in records] == [0, 1, 1]
    assert all("update/tis_weight_mean" in r and "time/rollout_wait" in r for r in records)
    noise = records[0]["rollout/gap_mean_abs"]    # step 1: sampled from the weights it trains: float noise only
    later = ", ".join(f"{r['rollout/gap_mean_abs']:.2e}" for r in records[1:])
    print(f"\nrollout gap |trainer - rollout| logprob: step 1 {noise:.2e}, steps 2-3 {later}")
    assert all(r["rollout/gap_mean_abs"] > 100 * max(noise, 1e-7) for r in records[1:])
    manifest = json.loads((out / "prism.json").read_text())
    assert manifest["config"]["overlap"] == 1 and manifest["config"]["tis_cap"] == 2.0


def test_dapo_with_overlap_draws_its_refill_batches_in_the_step(tmp_path):
    flags = dict(RL_TINY, algo="dapo", reward="tests.test_overlap:half_decided", prompts_per_step=4,
                 max_num_gen_batches=3)
    out = run_stage(RLConfig, rl_run.run, out=str(tmp_path / "dapo"), steps=2, overlap=1, **flags)
    records = _records(out)
    assert [r["rollout/policy_lag"] for r in records] == [0, 1]   # the first batch's; refills are at lag 0
    assert max(r["sampling/gen_batches"] for r in records) > 1         # refills were drawn
    assert all(r["sampling/groups_kept"] > 0 for r in records)


def test_held_out_evaluation_runs_beside_the_worker(tmp_path):
    """The evaluation samples the live policy in the main thread while the worker generates the next batch from
    its snapshot: both run and every step is evaluated."""
    out = run_stage(RLConfig, rl_run.run, out=str(tmp_path / "rl"), steps=3, overlap=1, eval_tasks=["synth"],
                    eval_every=1, eval_n=3, eval_max_new_tokens=8, **RL_TINY)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert sorted(r["step"] for r in records if "eval/synth/acc" in r) == [0, 1, 2, 3]
    assert [r["rollout/policy_lag"] for r in records if "reward/mean" in r] == [0, 1, 1]


def test_rl_overlap_one_resumes_and_redraws_the_batch_in_flight(tmp_path, monkeypatch):
    """Interrupted in step 3's update (step 3's batch and step 4's ahead batch drawn), then resumed from the
    state saved after step 2: steps 3 and 4 are redone, step 3 at lag 0 (nothing was generated ahead)."""
    out = tmp_path / "rl"
    flags = dict(out=str(out), steps=4, overlap=1, save_every=1, **RL_TINY)
    real_update = interrupt_at_call(monkeypatch, rl_run, "policy_update", 3)
    with pytest.raises(KeyboardInterrupt):
        run_stage(RLConfig, rl_run.run, **flags)
    monkeypatch.setattr(rl_run, "policy_update", real_update)
    run_stage(RLConfig, rl_run.run, resume=True, **flags)
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["rollout/policy_lag"] for r in records] == [0, 1, 0, 1]


# ------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("cls, flags, needle", [
    (RLConfig, dict(overlap=2, tis_cap=2.0), "--overlap takes 0 or 1"),
    (RLConfig, dict(overlap=1), "add --tis-cap 2"),
    (RLConfig, dict(overlap=1, tis_cap=2.0, engine="vllm"), "not supported with the vllm engine"),
    (RLConfig, dict(overlap=1, algo="gspo"), "gspo's ratio is per sequence"),
    (AlignConfig, dict(overlap=1, data=["synth"]), "add --tis-cap 2"),
    (AlignConfig, dict(overlap=1, tis_cap=2.0, data=["synth"], engine="vllm"), "not supported with the vllm engine"),
])
def test_overlap_options_it_cannot_run_with_are_refused(cls, flags, needle):
    with pytest.raises(UsageError) as caught:
        config.resolve(cls, flags=dict(ckpt="tiny", **flags))
    text = f"{caught.value} {getattr(caught.value, 'hint', '')}"
    assert needle in text, text


def test_overlap_under_sharded_parameters_is_refused():
    from stages.common.rollout import check_overlap
    check_overlap(1, 2.0, "hf", sharded=False)
    with pytest.raises(UsageError, match="sharded parameters"):
        check_overlap(1, 2.0, "hf", sharded=True)


# ------------------------------------------------------------------------------------------- processes

def _launch(tmp_path, backend: str, ok: bool):
    from tests.test_distributed import ROOT, _env, _run, _torchrun

    out = tmp_path / backend
    proc = _run(_torchrun() + ["-m", "prism_cli", "rl", "--algo", "grpo", "--ckpt", "tiny", "--data", "synth:train:64",
                               "--steps", "3", "--prompts-per-step", "2", "--rollouts-per-prompt", "4",
                               "--max-new-tokens", "8", "--lr", "1e-3", "--warmup", "0", "--reward", REWARD,
                               "--overlap", "1", "--tis-cap", "2", "--out", str(out)], ROOT,
                _env(PRISM_BACKEND=backend), ok=ok)
    return out, proc


@pytest.mark.dist
def test_two_ddp_processes_overlap_and_keep_identical_replicas(tmp_path):
    """torchrun, 2 CPU ranks under DDP: each rank's worker generates its share ahead without a collective; the
    ranks meet in the same collectives as without overlap (a stray one would hang or fail the run), and the
    replicas stay identical (the run raises otherwise)."""
    out, _ = _launch(tmp_path, "ddp", ok=True)
    summary = json.loads((out / "prism.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["backend"] == "ddp"
    assert len(summary["replica_weight_sums"]) == 2
    assert [r["rollout/policy_lag"] for r in _records(out)] == [0, 1, 1]


@pytest.mark.dist
def test_overlap_under_fsdp2_is_refused_before_the_output_is_written(tmp_path):
    out, proc = _launch(tmp_path, "fsdp2", ok=False)
    assert proc.returncode != 0
    assert "not supported with sharded parameters" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_dry_run_says_what_overlap_adds_to_memory(capsys):
    for cls, run, flags in ((RLConfig, rl_run.run, dict(algo="grpo")), (AlignConfig, align_run.run, dict(data=["synth"]))):
        assert run(config.resolve(cls, flags=dict(ckpt="tiny", overlap=1, tis_cap=2.0, dry_run=True, **flags))) is None
        text = " ".join(capsys.readouterr().out.split())
        assert "--overlap 1: one more copy of the policy's weights" in text, text


def test_the_cli_refuses_overlap_without_the_correction_in_one_line(tmp_path):
    from tests.test_cli import invoke, one_error_line

    out = tmp_path / "rl"
    line = one_error_line(invoke("rl", "--ckpt", "tiny", "--overlap", "1", "--out", out), 2, "--overlap 1",
                          "--tis-cap 2")
    assert "off-policy" in line and not out.exists()
    one_error_line(invoke("align", "--ckpt", "tiny", "--data", "synth", "--overlap", "2", "--tis-cap", "2",
                          "--out", out), 2, "--overlap takes 0 or 1")
