"""The variant tables (RL algorithms, teachers, benchmark tasks, rollout engines, align advantage modes, trackers;
rewards in tests/test_reward_table.py, data formats in tests/test_data_formats.py): an unknown name is one error
line that lists the registered names (non-zero exit), and a registered row is what the stage uses."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from prism_cli.app import app
from stages.common.contract.errors import UsageError
from stages.common.contract.registry import Registry
from stages.common.policy_update import advantages, losses
from stages.common.rollout import ENGINES, make_engine
from stages.curate.teachers import TEACHERS, parse_teacher
from stages.eval import lmms_runner
from stages.eval.tasks import BENCHMARKS, SCORERS, plan_tasks, task_names
from stages.rl.algorithms import ALGORITHMS, Algorithm
from stages.rl.config import RLConfig
from stages.rl.run import ppo_settings


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_unknown_algo_lists_the_registered_ones(tmp_path):
    line = _one_error_line(CliRunner().invoke(app, ["rl", "--algo", "dapoo", "--ckpt", "tiny", "--dry-run",
                                                    "--out", str(tmp_path / "o")]))
    assert "'dapoo'" in line and "grpo, dapo, gspo" in line


def test_unknown_teacher_lists_the_registered_ones(tmp_path):
    for name in ("oracel", "gpt-5"):
        line = _one_error_line(CliRunner().invoke(app, ["curate", "--teacher", name, "--source", "synth:train:2",
                                                        "--dry-run", "--out", str(tmp_path / "o")]))
        assert repr(name) in line and "oracle, oracle-noisy" in line and "openai:URL#MODEL" in line, line
    # what did parse keeps parsing the same way
    assert parse_teacher("gemini-3-flash").kind == "gemini" and parse_teacher("gemini:my-tuned").model == "my-tuned"


def test_unknown_task_without_lmms_eval_lists_the_registered_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(lmms_runner, "lmms_available", lambda: False)
    line = _one_error_line(CliRunner().invoke(app, ["eval", "--ckpt", "tiny", "--tasks", "synthh", "--dry-run",
                                                    "--out", str(tmp_path / "o")]))
    assert "'synthh'" in line and ", ".join(task_names()) in line


def test_unknown_task_with_lmms_eval_lists_the_registered_ones():
    class Manager:
        all_tasks = ["mmmu_val"]
    with pytest.raises(UsageError, match="registered tasks are synth, mathvista"):
        lmms_runner.check_known(plan_tasks("synthh"), task_manager=Manager())


def test_unknown_engine_lists_the_registered_ones():
    with pytest.raises(UsageError, match="registered rollout engines are auto, vllm, hf"):
        make_engine("sglang", None, None)


def test_registry_refuses_a_name_twice():
    table: Registry[int] = Registry("thing", "--thing")
    table.register("a", 1)
    with pytest.raises(ValueError, match="twice"):
        table.register("a", 2)
    with pytest.raises(UsageError, match="unknown --thing 'b': registered things are a"):
        table.get("b")


def test_the_tables_name_what_the_stages_use():
    assert ALGORITHMS.names() == ["grpo", "dapo", "gspo"]
    assert ALGORITHMS.get("gspo").loss == "gspo_loss" and ALGORITHMS.get("dapo").loss == "ppo_clip_loss"
    for _, row in ALGORITHMS.items():  # every row names functions that exist
        assert callable(getattr(losses, row.loss)) and callable(getattr(advantages, row.advantage))
    assert TEACHERS.names() == ["oracle", "openai", "hf", "gemini"]
    assert ENGINES.names() == ["vllm", "hf"]
    assert set(SCORERS) == {t for b in BENCHMARKS.values() for t in b.override_tasks}


def test_a_registered_algorithm_reaches_the_policy_update(monkeypatch):
    """A new row is all rl needs: its defaults fill the config and its loss is the one ppo_update calls."""
    def half_clip_loss(logp, old_logp, advantages, mask, **kw):
        return losses.ppo_clip_loss(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setattr(losses, "half_clip_loss", half_clip_loss, raising=False)
    row = Algorithm("test row", "half_clip_loss", "group_normalized_advantages", clip_low=0.1, clip_high=0.3,
                    loss_agg="seq-mean-token-sum", dynamic_sampling=False, overlong_buffer=0)
    monkeypatch.setitem(ALGORITHMS._entries, "halfclip", row)
    cfg = RLConfig(algo="halfclip", ckpt="tiny", out="x")
    cfg.validate()
    settings = ppo_settings(cfg)
    assert (settings.loss, settings.clip_low, settings.clip_high, settings.agg) == (half_clip_loss, 0.1, 0.3,
                                                                                    "seq-mean-token-sum")
    adv = getattr(advantages, row.advantage)(torch.tensor([1.0, 0.0, 2.0, 2.0]), [0, 0, 1, 1], True)
    assert adv[2:].abs().sum() == 0 and adv[0] > 0 > adv[1]


def test_align_advantage_modes_are_a_table(tmp_path, monkeypatch):
    """Every row names a function of stages.align.advantage, an unknown mode lists the registered ones, and a
    new row is what game_advantages applies."""
    from stages.align import advantage as align_advantage
    from stages.align.config import ADVANTAGE_MODES, AdvantageMode
    from stages.align.objective import GroupScores
    from stages.align.run import game_advantages

    assert ADVANTAGE_MODES.names() == ["prism", "acc-gated", "rlvr-mixed"]
    for _, row in ADVANTAGE_MODES.items():
        assert callable(getattr(align_advantage, row.adjust))
    line = _one_error_line(CliRunner().invoke(app, ["align", "--ckpt", "tiny", "--data", "synth:train:2",
                                                    "--advantage-mode", "acc-gatd", "--dry-run",
                                                    "--out", str(tmp_path / "o")]))
    assert "'acc-gatd'" in line and "prism, acc-gated, rlvr-mixed" in line

    scores = GroupScores(teacher_caption=torch.zeros(2), teacher_think=torch.zeros(2),
                         student_caption=torch.tensor([[1.0, -1.0], [0.5, 0.0]]),
                         student_think=torch.tensor([[1.0, -1.0], [0.0, 0.5]]),
                         format_ok=torch.ones(2, 2, dtype=torch.bool), aux_loss=None, tokens=0)
    rewards = {"acc": torch.tensor([[0.0, 1.0], [1.0, 1.0]]), "score": torch.tensor([[0.2, 1.0], [1.0, 1.0]])}
    from stages.align.config import AlignConfig
    cfg = AlignConfig(ckpt="tiny", data=["synth"], advantage_mode="acc-gated")
    prism_only = game_advantages(AlignConfig(ckpt="tiny", data=["synth"]), scores, rewards)
    gated = game_advantages(cfg, scores, rewards)
    assert prism_only[0] > 0 and gated[0] == 0 and torch.equal(gated[1:], prism_only[1:])
    monkeypatch.setattr(align_advantage, "negated", lambda adv, rewards, groups: -adv, raising=False)
    monkeypatch.setitem(ADVANTAGE_MODES._entries, "negated", AdvantageMode("test row", "negated"))
    assert torch.equal(game_advantages(AlignConfig(ckpt="tiny", data=["synth"], advantage_mode="negated"), scores,
                                       rewards), -prism_only)


def test_trackers_are_a_table(monkeypatch):
    from stages.common.contract import tracking

    assert tracking.TRACKERS.names()[:2] == ["tensorboard", "wandb"]
    with pytest.raises(UsageError, match="unknown tracker 'tensorbord'"):
        tracking.parse("tensorbord")
    # a row's readiness check is what parse asks (wandb: a login), and its init arguments reach accelerate
    monkeypatch.setitem(tracking.TRACKERS._entries, "fake", tracking.Tracker(
        "json", "json", lambda: "the fake service is down", ready_hint="start it"))
    with pytest.raises(UsageError, match="--report-to fake: the fake service is down"):
        tracking.parse("fake")
    monkeypatch.setitem(tracking.TRACKERS._entries, "fake", tracking.Tracker(
        "json", "json", init_kwargs=lambda out, stage: {"dir": out, "stage": stage}))

    class Accelerator:
        def init_trackers(self, project, config, init_kwargs):
            self.seen = (project, init_kwargs)
    acc = Accelerator()
    tracking.start(acc, "rl", {"lr": 1.0}, "fake", "outdir")
    assert acc.seen == ("prism-rl", {"fake": {"dir": "outdir", "stage": "rl"}})


def test_rules_about_variants_read_their_rows(monkeypatch):
    """tis_cap asks the algorithm's row whether its ratio is per token; --batch asks the teacher's row whether it has
    a batch API; a teacher's name is what its parse wrote (no name checks outside the tables)."""
    with pytest.raises(UsageError, match="gspo's ratio is per sequence") as e:
        RLConfig(algo="gspo", ckpt="tiny", tis_cap=2.0).validate()
    assert e.value.hint == "use grpo or dapo"
    RLConfig(algo="grpo", ckpt="tiny", tis_cap=2.0).validate()
    assert [n for n, k in TEACHERS.items() if k.batch_api] == ["gemini"]
    assert [parse_teacher(t).name for t in ("hf:out/sft", "gemini-3-flash", "oracle-noisy", "openai:http://h/v1#m")] \
        == ["hf:out/sft", "gemini-3-flash", "oracle-noisy", "openai:m"]


def test_first_attribute_takes_the_first_path_that_exists():
    from types import SimpleNamespace as NS

    from stages.common.models.parts import first_attribute
    inner, top = object(), object()
    model = NS(model=NS(visual=inner, layers=None), visual=top)
    assert first_attribute(model, ("model.visual", "visual")) is inner
    assert first_attribute(model, ("model.layers", "visual")) is top        # a None on the way counts as absent
    assert first_attribute(model, ("model.language_model.layers", "lm_head")) is None


def test_the_paper_average_is_the_rows_marked_paper():
    """A benchmark added to the table is not silently counted in the paper's headline average."""
    from stages.eval.tasks import PAPER_TASKS, Benchmark

    assert PAPER_TASKS == ("mathvista", "mathverse", "mathvision", "wemath", "mmmu", "mmmu_pro", "hallusionbench")
    assert not Benchmark("x", {}, (), "acc", False, "note").paper
