"""--dry-run runs every check a launch runs, at the world size it is asked to plan for: for each paper recipe at
8, 16 and 32 GPUs, the dry run and the launch's own checks (driven in-process up to the model load, with a
fake accelerator of that many processes) agree. And how a step's groups are spread over the processes when
there are more processes than prompts (align's 4 prompts x 16 rollouts on 8+ GPUs)."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest
import torch

from stages.common.contract import config as config_mod
from stages.common.contract.errors import PrismError, UsageError
from stages.common.training.groups import group_layout
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "recipes" / "qwen3vl-4b"
# recipe -> (stage, flags replacing what exists only on a cluster: the data paths; and the policy as its hub id,
# which plans offline from the published config)
RECIPES = {
    "sft": ("sft", {"data": ["synth:train:256"]}),
    "align": ("align", {"ckpt": "Qwen/Qwen3-VL-4B-Instruct", "data": ["synth:64"]}),
    "rl-grpo": ("rl", {"ckpt": "Qwen/Qwen3-VL-4B-Instruct", "data": ["synth:64"]}),
    "rl-dapo": ("rl", {"ckpt": "Qwen/Qwen3-VL-4B-Instruct", "data": ["synth:64"]}),
    "rl-gspo": ("rl", {"ckpt": "Qwen/Qwen3-VL-4B-Instruct", "data": ["synth:64"]}),
}
CONFIGS = {"sft": ("stages.sft.config", "SFTConfig"), "align": ("stages.align.config", "AlignConfig"),
           "rl": ("stages.rl.config", "RLConfig")}


def _cfg(recipe: str, tmp_path, **flags):
    stage, overrides = RECIPES[recipe]
    module, name = CONFIGS[stage]
    cls = getattr(importlib.import_module(module), name)
    return stage, config_mod.resolve(cls, str(PAPER / f"{recipe}.yaml"),
                                     {**overrides, "out": str(tmp_path / recipe), **flags})


class ReachedModelLoad(Exception):
    """The launch passed every check it runs before loading a model."""


def _launch_checks(stage: str, cfg, world: int, monkeypatch) -> str | None:
    """The stage's real launch path, up to its first model load, with an accelerator of `world` processes:
    None if every check passes, else the error's message."""
    run_module = importlib.import_module(f"stages.{stage}.run")
    accelerator = types.SimpleNamespace(num_processes=world, process_index=0, device=torch.device("cpu"),
                                        is_main_process=True, wait_for_everyone=lambda: None)
    monkeypatch.setattr(run_module.training, "make_runtime", lambda *a, **k: types.SimpleNamespace(
        accelerator=accelerator, backend=None))

    def reached(*args, **kwargs):
        raise ReachedModelLoad

    monkeypatch.setattr(run_module, "load_processor", reached)
    try:
        run_module.run(cfg)
    except ReachedModelLoad:
        return None
    except PrismError as e:
        return e.message
    raise AssertionError("the launch went past the model load")


def _dry_run(stage: str, cfg, world: int, capsys) -> tuple[str | None, str]:
    """(None if the dry run passes, else its error's message; what it printed)."""
    import dataclasses

    run_module = importlib.import_module(f"stages.{stage}.run")
    cfg = dataclasses.replace(cfg, dry_run=True, world_size=world, backend="zero2", gpu_memory="80GiB")
    try:
        run_module.run(cfg)
        error = None
    except PrismError as e:
        error = e.message
    return error, capsys.readouterr().out


@pytest.mark.parametrize("world", [8, 16, 32])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_dry_run_and_launch_agree_for_each_paper_recipe(recipe, world, tmp_path, monkeypatch, capsys):
    stage, cfg = _cfg(recipe, tmp_path)
    launch = _launch_checks(stage, cfg, world, monkeypatch)
    dry, out = _dry_run(stage, cfg, world, capsys)
    # The paper's recipes pass the launch's checks at 8, 16 and 32 GPUs (align splits its 4 groups)
    assert launch is None, launch
    if dry is None:
        assert f"memory per GPU (zero2 x {world})" in out and "fits: peak" in out
        assert "peak per phase: " in out
        phases = {"sft": ["update"], "rl": ["rollout", "update"],
                  "align": ["warmup", "rollout", "scoring", "update"]}[stage]
        assert [p.split(" ")[0] for p in out.split("peak per phase: ")[1].splitlines()[0].split(", ")] == phases
    else:   # a refusal is the plan's, in one line: the batch checks agreed
        assert dry.startswith("the memory plan does not fit") and "\n" not in dry


@pytest.mark.parametrize("recipe,world,flags,expected", [
    ("align", 6, {}, "prompts_per_step 4 cannot be spread evenly over 6 processes"),
    ("align", 12, {}, "each group would be split over 3 processes, which do not divide its 16 rollouts"),
    ("align", 8, {"rollouts_per_prompt": 5}, "which do not divide its 5 rollouts"),
    ("align", 8, {"warmup_batch": 60}, "warmup_batch 60 is not divisible by the 8 processes"),
    ("rl-dapo", 24, {}, "prompts_per_step 32 is not divisible by the 24 processes"),
    ("sft", 24, {}, "batch_size 128 is not divisible by micro_batch_size x processes (2 x 24)"),
])
def test_dry_run_refuses_what_the_launch_refuses_in_one_line(recipe, world, flags, expected, tmp_path,
                                                             monkeypatch, capsys):
    stage, cfg = _cfg(recipe, tmp_path, **flags)
    launch = _launch_checks(stage, cfg, world, monkeypatch)
    dry, out = _dry_run(stage, cfg, world, capsys)
    assert launch == dry and expected in dry and "\n" not in dry
    assert "memory per GPU" not in out              # refused before the plan is printed


def test_dry_run_runs_the_launch_out_check(tmp_path, monkeypatch, capsys):
    stage, cfg = _cfg("rl-grpo", tmp_path)
    done = tmp_path / "rl-grpo"
    done.mkdir()
    (done / "prism.json").write_text("{}")
    launch = _launch_checks(stage, cfg, 8, monkeypatch)
    dry, _ = _dry_run(stage, cfg, 8, capsys)
    assert launch == dry and "already holds a complete" in dry


def test_a_plan_that_does_not_fit_is_refused_in_one_line_after_its_table(tmp_path, capsys):
    stage, cfg = _cfg("align", tmp_path)
    import dataclasses

    run_module = importlib.import_module("stages.align.run")
    with pytest.raises(PrismError) as err:
        run_module.run(dataclasses.replace(cfg, dry_run=True, world_size=8, backend="zero2", gpu_memory="40GiB"))
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "peak per phase: " in out
    assert err.value.message.startswith("the memory plan does not fit: its update phase needs")
    assert "of 40.00 GiB per GPU (zero2 x 8)" in err.value.message and "\n" not in err.value.message


# ------------------------------------------------------------------------------------ groups over processes

def test_group_layout_whole_groups_and_split_groups():
    whole = group_layout(32, 16, 8)
    assert (whole.ranks_per_group, whole.prompts_per_rank, whole.rollouts_per_rank) == (1, 4, 16)
    assert list(whole.prompt_indices(7)) == [28, 29, 30, 31]
    for world, split, per_rank in ((8, 2, 8), (16, 4, 4), (32, 8, 2)):   # the paper's align step
        layout = group_layout(4, 16, world)
        assert (layout.ranks_per_group, layout.prompts_per_rank, layout.rollouts_per_rank) == (split, 1, per_rank)
        owners = [list(layout.prompt_indices(r)) for r in range(world)]
        assert owners == [[r // split] for r in range(world)]
        assert layout.rollouts_per_rank * world == 4 * 16               # every rollout generated exactly once
    assert group_layout(4, 16, 4).ranks_per_group == 1
    for prompts, rollouts, world in ((4, 16, 12), (6, 16, 4), (4, 6, 16)):
        with pytest.raises(UsageError):
            group_layout(prompts, rollouts, world)


def test_split_group_advantages_equal_the_whole_group_ones():
    """A group split over two processes: each process's gathered-then-sliced advantages equal the slice of the
    advantages one process computes over the whole group (group normalisation over all n rollouts)."""
    from stages.align.config import AlignConfig
    from stages.align.objective import GroupScores
    from stages.align.run import game_advantages, gather_split_groups, split_group_slice

    cfg = AlignConfig(prompts_per_step=2, rollouts_per_prompt=4)
    layout = group_layout(2, 4, 4)                       # 2 groups x 4 rollouts over 4 processes: 2 each
    g = torch.Generator().manual_seed(0)
    caption, think = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    fmt = torch.tensor([[True, False, True, True], [True, True, True, False]])
    acc = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    whole = GroupScores(teacher_caption=torch.tensor([5.0, 6.0]), teacher_think=torch.tensor([7.0, 8.0]),
                        student_caption=caption, student_think=think, format_ok=fmt)
    expected = game_advantages(cfg, whole, {"acc": acc, "score": acc})
    assert expected.std() > 0.5                            # not a degenerate case

    def piece(t, rank):   # what process `rank` holds: [1, 2] slice of group rank // 2
        return t[rank // 2, (rank % 2) * 2:(rank % 2) * 2 + 2][None]

    def fake_gather(t):   # accelerate's gather: every process's tensor concatenated in rank order
        return torch.cat([pieces[r][id_of[id(t)]] for r in range(4)])

    for rank in range(4):
        pieces = []
        for r in range(4):
            pieces.append({"student_caption": piece(caption, r), "student_think": piece(think, r),
                           "format_ok": piece(fmt, r).float(), "acc": piece(acc, r), "score": piece(acc, r),
                           "teacher_caption": whole.teacher_caption[r // 2][None],
                           "teacher_think": whole.teacher_think[r // 2][None]})
        mine = GroupScores(teacher_caption=pieces[rank]["teacher_caption"],
                           teacher_think=pieces[rank]["teacher_think"], student_caption=pieces[rank]["student_caption"],
                           student_think=pieces[rank]["student_think"], format_ok=piece(fmt, rank))
        rewards = {"acc": pieces[rank]["acc"], "score": pieces[rank]["score"]}
        # the gather sees the float copies made on its way in: map them back by the order they are sent
        sent = iter(["teacher_caption", "teacher_think", "student_caption", "student_think", "format_ok", "acc",
                     "score"])
        id_of = {}

        class Accelerator:
            device = torch.device("cpu")

            @staticmethod
            def gather(t):
                id_of[id(t)] = next(sent)
                return fake_gather(t)

        got_scores, got_rewards = gather_split_groups(Accelerator, layout, mine, rewards)
        assert torch.equal(got_scores.student_caption, caption) and torch.equal(got_scores.format_ok, fmt)
        assert torch.equal(got_scores.teacher_caption, whole.teacher_caption)
        assert torch.equal(got_rewards["acc"], acc)
        got = split_group_slice(game_advantages(cfg, got_scores, got_rewards), layout, rank)
        assert torch.allclose(got, expected[rank * 2:rank * 2 + 2], atol=1e-6, rtol=0)


@pytest.mark.dist
def test_align_runs_a_group_split_over_two_ranks_under_zero2(tiny_path, tmp_path):
    """One prompt x 4 rollouts on 2 processes (the paper's 4 x 16 on 8 GPUs, scaled down): each rank rolls out 2
    of the group's rollouts, scores them, and normalises advantages over the gathered group of 4."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PRISM_NO_PROGRESS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    sft = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "-m", "prism_cli", "sft", "--ckpt", "tiny", "--data", "synth:train:32",
                           "--batch-size", "8", "--max-steps", "2", "--set", "eval_fraction=0", "--out", str(sft)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    align = tmp_path / "align"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "prism_cli", "align", "--ckpt", str(sft), "--data", "synth:train:32",
                           "--steps", "2", "--prompts-per-step", "1", "--rollouts-per-prompt", "4",
                           "--max-new-tokens", "12", "--warmup-steps", "1", "--warmup-prompts", "4",
                           "--warmup-batch", "2", "--out", str(align)],
                          cwd=tmp_path, env=dict(env, PRISM_BACKEND="zero2"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((align / "prism.json").read_text())["summary"]
    assert summary["processes"] == 2 and summary["steps"] == 2
