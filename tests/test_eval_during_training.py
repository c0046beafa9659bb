"""Held-out evaluation inside training (--eval-tasks, --eval-every, --eval-n) and keeping the best (--keep best:METRIC,
consumed as --ckpt OUT#best): the pure parts on hand-made data, then the stages on the tiny model (docs/eval-during-
training.md). The runs are short: tiny's answers score 0, so what is asserted is where the numbers go (metrics,
plots, manifest, the best's weights and lineage), and the rule of the best on resume, not what the numbers are."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from stages.align.config import AlignConfig
from stages.align.run import run as align
from stages.common.contract import checkpoint, plots
from stages.common.contract.errors import PrismError, UsageError
from stages.common.evaluation import held_out, options
from stages.common.evaluation.options import (
    HELD_OUT_PANEL,
    eval_due,
    evaluations_planned,
    is_better,
    padded,
    parse_keep,
    pick_best,
    rank_share,
)
from stages.rl.config import RLConfig
from stages.rl.run import run as rl
from tests.conftest import interrupt_at_call, run_stage

EVAL = dict(eval_tasks=["synth"], eval_every=1, eval_n=3, eval_max_new_tokens=8)
RL_TINY = dict(data=["synth:train:16"], prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8, seed=0)


# ------------------------------------------------------------------------------------------ the pure parts

def test_keep_names_an_evaluation_metric():
    assert parse_keep("") is None
    assert parse_keep("best:synth/acc") == "eval/synth/acc"
    assert parse_keep("best:eval/synth/caption_f1") == "eval/synth/caption_f1"
    for bad in ("synth/acc", "worst:synth/acc", "best:synth/loss", "best:mathvista/acc", "best:synth"):
        with pytest.raises(UsageError):
            parse_keep(bad)


@pytest.mark.parametrize("flags,words", [
    (dict(keep="best:synth/acc"), "--eval-tasks synth"),                   # ranks by an evaluation never made
    (dict(eval_tasks=["mathvista"]), "prism eval"),                        # only synth during training
    (dict(eval_tasks=["synth:test:6"]), "--eval-tasks synth --eval-n N"),  # a data spec for the task's name
    (dict(eval_tasks=["synth"], eval_synth="synth:train:200"), "test split"),
    (dict(eval_tasks=["synth"], data=["synth:test:32"]), "test split"),   # training on the held-out problems
    (dict(eval_tasks=["synth"], eval_n=0), "eval_n"),
])
def test_bad_evaluation_options_are_one_line_before_anything_runs(flags, words):
    with pytest.raises(UsageError) as e:
        run_stage(RLConfig, lambda cfg: cfg, ckpt="tiny", **{**RL_TINY, **flags})
    assert words in e.value.message + (e.value.hint or "")


def test_sft_has_no_max_new_tokens_to_fall_back_on():
    from stages.sft.config import SFTConfig

    with pytest.raises(UsageError, match="eval-max-new-tokens must be >= 1"):
        run_stage(SFTConfig, lambda cfg: cfg, eval_tasks=["synth"], eval_max_new_tokens=0)
    assert run_stage(RLConfig, lambda cfg: cfg, ckpt="tiny", eval_tasks=["synth"], eval_max_new_tokens=0)


def test_when_the_evaluation_runs():
    assert [s for s in range(1, 8) if eval_due(s, 3, 7)] == [3, 6, 7]     # every 3, and at the end
    assert [s for s in range(1, 7) if eval_due(s, 3, 6)] == [3, 6]         # the end once, not twice
    assert evaluations_planned(7, 3) == 3 and evaluations_planned(20, 5) == 4 and evaluations_planned(2, 1) == 2


@pytest.mark.parametrize("n,world", [(5, 2), (1, 2), (2, 2), (7, 3), (3, 4), (64, 8), (10, 1)])
def test_rank_shares_cover_every_problem_once_in_order_with_equal_generate_calls(n, world):
    shares = [rank_share(n, rank, world) for rank in range(world)]
    assert [i for mine, _ in shares for i in mine] == list(range(n))      # gathered in rank order: the order
    sizes = {len(padded(mine, share)) for mine, share in shares}
    assert sizes == {-(-n // world)}                                      # lockstep: the same calls everywhere
    for mine, share in shares:
        assert all(0 <= i < n for i in padded(mine, share))


def test_rank_share_by_hand():
    assert rank_share(5, 0, 2) == ([0, 1, 2], 3) and rank_share(5, 1, 2) == ([3, 4], 3)
    assert padded([3, 4], 3) == [3, 4, 3] and padded([], 2) == [0, 0]


def test_the_best_is_strictly_higher_and_never_nan():
    assert is_better(0.1, None) and is_better(0.2, 0.1)
    assert not is_better(0.1, 0.1) and not is_better(0.0, 0.1) and not is_better(math.nan, None)
    records = [{"step": 0, "eval/synth/acc": 0.25}, {"step": 1, "loss": 3.0}, {"step": 2, "eval/synth/acc": 0.5},
               {"step": 3, "eval/synth/acc": 0.5}, {"step": 4, "eval/synth/acc": math.nan},
               {"step": 5, "eval/synth/acc": True}, {"step": 6, "eval/synth/acc": 0.375}]
    assert pick_best(records, "eval/synth/acc") == {"metric": "eval/synth/acc", "step": 2, "value": 0.5}
    assert pick_best(records, "eval/synth/format") is None


def test_the_plan_prices_the_evaluation():
    cfg = SimpleNamespace(eval_tasks=["synth"], eval_every=5, eval_n=32, eval_max_new_tokens=0, max_new_tokens=64,
                          keep="best:synth/acc")
    _, line = options.plan_row(cfg, 20, 1280)
    assert "5 evaluations" in line and "160 generations" in line and "12%" in line and "eval/synth/acc" in line
    assert options.plan_row(SimpleNamespace(eval_tasks=[]), 20, 1280) is None


class _Accelerator:
    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass


class _Trained:
    """What save_model needs of a trained model: its full state dict, save_pretrained on its module."""

    def __init__(self, value):
        self.module = SimpleNamespace(save_pretrained=self._save)
        self.value = value

    def full_state_dict(self):
        return {"w": torch.tensor([self.value])}

    def _save(self, out, state_dict, safe_serialization):
        (out / "weights.json").write_text(json.dumps(state_dict["w"].tolist()))


def test_a_best_is_swapped_in_whole_and_recovered_after_a_crash(tmp_path):
    processor = SimpleNamespace(save_pretrained=lambda out: None)
    held_out.save_best(_Accelerator(), _Trained(1.0), processor, tmp_path, {"metric": "m", "step": 1, "value": 0.1})
    held_out.save_best(_Accelerator(), _Trained(2.0), processor, tmp_path, {"metric": "m", "step": 4, "value": 0.3})
    assert held_out.saved_best(tmp_path)["step"] == 4
    assert json.loads((tmp_path / "best" / "model" / "weights.json").read_text()) == [2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]          # nothing left aside or half-written
    # a crash while writing: the half-written copy goes, the best stays
    (tmp_path / "best.saving" / "model").mkdir(parents=True)
    held_out.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and held_out.saved_best(tmp_path)["step"] == 4
    # a crash between moving the old best aside and renaming the new one in: the old one comes back
    (tmp_path / "best").rename(tmp_path / "best.old")
    held_out.recover(tmp_path)
    assert held_out.saved_best(tmp_path)["step"] == 4 and not (tmp_path / "best.old").exists()


# ------------------------------------------------------------------------------------------ the stages

def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _evals(records) -> dict:
    return {r["step"]: r for r in records if "eval/seconds" in r}


def test_align_evaluates_keeps_the_best_and_rl_takes_it(tmp_path):
    out = run_stage(AlignConfig, align, ckpt="tiny", data=["synth:train:16"], out=str(tmp_path / "align"), steps=2,
                    prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8, warmup_steps=1, warmup_prompts=4,
                    warmup_batch=2, seed=0, keep="best:synth/acc", **EVAL)
    evals = _evals(_records(out))
    assert sorted(evals) == [0, 1, 2]                                     # the start, every step, the end
    for record in evals.values():
        assert record["eval/synth/n"] == 3 and 0 <= record["eval/synth/acc"] <= 1
        assert 0 <= record["eval/synth/caption_f1"] <= 1 and record["eval/seconds"] > 0
    assert "gap/caption" in evals[1] and "time/eval" in evals[1]          # beside the game's own metrics
    drawn = plots.panel_data(_records(out), HELD_OUT_PANEL)
    assert [x for x, _ in drawn["held-out synth (greedy)"]["accuracy"]] == [0, 1, 2]
    assert (out / "drift_gap.png").stat().st_size > 1000

    manifest = json.loads((out / "prism.json").read_text())
    best = manifest["summary"]["best"]
    assert best == dict(pick_best(_records(out), "eval/synth/acc"), dir="best")
    assert "best/model/model.safetensors" in manifest["files"] and "best/best.json" in manifest["files"]

    spec = checkpoint.resolve(f"{out}#best")
    assert spec.model_path == str(out / "best" / "model") and spec.fingerprint.endswith("#best")
    assert checkpoint.resolve(str(out)).model_path == str(out / "model")

    rl_out = run_stage(RLConfig, rl, ckpt=f"{out}#best", out=str(tmp_path / "rl"), steps=1, **RL_TINY)
    parent = json.loads((rl_out / "prism.json").read_text())["parents"][0]
    assert parent["variant"] == "best" and parent["ref"].endswith("#best") and parent["fingerprint"] == spec.fingerprint
    chain = checkpoint.lineage(checkpoint.resolve(str(rl_out)))
    assert chain[1]["ref"].endswith("#best") and chain[1]["ok"] and chain[-1]["ref"] == "tiny"
    with pytest.raises(PrismError, match="kept no best checkpoint"):       # a run without --keep has no #best
        checkpoint.resolve(f"{rl_out}#best")
    with pytest.raises(PrismError, match="unknown variant"):
        checkpoint.resolve(f"{out}#worst")


def test_resume_keeps_the_best_and_ranks_against_it(tmp_path, monkeypatch):
    """Interrupted after step 2 (state saved every step), then resumed: the best kept before (tiny scores 0 at every
    evaluation, so the best is step 0's: a tie never replaces it) stays, ranks the evaluations to come, and a
    half-written best.saving/ left by the crash is never consumed."""
    import stages.rl.run as rl_run

    out = tmp_path / "rl"
    flags = dict(ckpt="tiny", out=str(out), steps=3, save_every=1, keep="best:synth/acc", **RL_TINY, **EVAL)
    real_update = interrupt_at_call(monkeypatch, rl_run, "policy_update", 3)
    with pytest.raises(KeyboardInterrupt):
        run_stage(RLConfig, rl, **flags)
    before = held_out.saved_best(out)
    assert before is not None and before["step"] == 0 and not (out / "prism.json").exists()
    (out / "best.saving" / "model").mkdir(parents=True)                    # what a crash mid-save leaves
    (out / "best.saving" / "model" / "config.json").write_text("{half")

    monkeypatch.setattr(rl_run, "policy_update", real_update)
    run_stage(RLConfig, rl, resume=True, **flags)
    records = _records(out)
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2, 3]  # no step logged twice
    assert sorted(_evals(records)) == [0, 1, 2, 3]
    manifest = json.loads((out / "prism.json").read_text())
    assert manifest["summary"]["steps"] == 3 and manifest["summary"]["evaluations"] == 4   # step 0 is no step
    assert manifest["summary"]["best"] == dict(before, dir="best") == dict(pick_best(records, "eval/synth/acc"),
                                                                           dir="best")
    assert not (out / "best.saving").exists() and not any(f.startswith("best.saving") for f in manifest["files"])
    assert checkpoint.resolve(f"{out}#best").model_path == str(out / "best" / "model")


@pytest.mark.dist
def test_two_ranks_split_the_evaluation_in_lockstep(tmp_path):
    """torchrun, 2 CPU ranks under FSDP2 (every forward a collective): 3 held-out problems split 2 + 1 and generated
    one per call, the short share padded, so both ranks make the same generate calls and finish (unpadded, rank 0's
    second call waits forever on rank 1); the records are gathered (n is 3)."""
    from tests.test_distributed import ROOT, _env, _run, _torchrun

    out = tmp_path / "rl"
    _run(_torchrun() + ["-m", "prism_cli", "rl", "--ckpt", "tiny", "--data", "synth:train:16", "--steps", "2",
                        "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "8",
                        "--eval-tasks", "synth", "--eval-every", "1", "--eval-n", "3", "--eval-max-new-tokens", "8",
                        "--keep", "best:synth/caption_f1", "--set", "eval_batch_size=1", "--out", str(out)], ROOT,
         _env(PRISM_BACKEND="fsdp2"))
    summary = json.loads((out / "prism.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["backend"] == "fsdp2"
    evals = _evals(_records(out))
    assert sorted(evals) == [0, 1, 2] and all(r["eval/synth/n"] == 3 for r in evals.values())
    assert summary["best"]["metric"] == "eval/synth/caption_f1" and (out / "best" / "model" / "config.json").is_file()


def test_the_evaluation_in_training_scores_as_prism_eval_does(sft_tiny, tmp_path):
    """Step 0's evaluation of an sft run is the input's: `prism eval` of that input on the same problems (synth:test,
    first N, seed 0, same max tokens) gives the same numbers, because both run stages/common/evaluation/synth.py.
    sft_tiny answers in format, so the numbers are not all zero."""
    from stages.eval.config import EvalConfig
    from stages.eval.run import run as evaluate
    from stages.sft.config import SFTConfig
    from stages.sft.run import run as sft

    out = run_stage(SFTConfig, sft, ckpt=str(sft_tiny), data=["synth:train:64"], out=str(tmp_path / "sft"),
                    max_steps=1, batch_size=8, micro_batch_size=8, eval_fraction=0, eval_tasks=["synth"], eval_n=8,
                    eval_max_new_tokens=96, seed=3)
    step0 = _evals(_records(out))[0]
    ev = run_stage(EvalConfig, evaluate, ckpt=[str(sft_tiny)], tasks=["synth"], synth="synth:test:200", limit=8,
                   max_new_tokens=96, engine="hf", seed=0, out=str(tmp_path / "eval"))
    synth = json.loads((ev / "results.json").read_text())["tasks"]["synth"]
    assert step0["eval/synth/format"] > 0                                  # a policy that answers in format
    assert step0["eval/synth/n"] == synth["n"] == 8
    assert step0["eval/synth/acc"] == synth["value"]
    for key in ("format", "caption_f1", "caption_precision", "caption_recall"):
        assert step0[f"eval/synth/{key}"] == synth["extra"][key], key
