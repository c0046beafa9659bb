"""--out safety (issue 19): an --out that is, lies inside or holds an input checkpoint is refused before
anything is deleted; one writer per --out (an exclusive lock; a stale lock of a dead process is taken over)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.contract import checkpoint
from stages.common.contract.checkpoint import LOCK, MANIFEST, open_output, resolve
from stages.common.contract.errors import PrismError
from tests.test_checkpoint import CONFIG, make_ckpt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def parent(tmp_path):
    return make_ckpt(tmp_path / "sft")


@pytest.mark.parametrize("where", [".", "model", "model/deeper"])
def test_out_equal_to_or_inside_an_input_is_refused_before_deleting(parent, where):
    out = parent / where
    before = sorted(p.relative_to(parent).as_posix() for p in parent.rglob("*"))
    with pytest.raises(PrismError, match="input checkpoint"):
        open_output(str(out), "sft", dict(CONFIG, out=str(out)), [("policy", resolve(str(parent)))],
                    overwrite=True)
    assert sorted(p.relative_to(parent).as_posix() for p in parent.rglob("*")) == before
    resolve(str(parent))  # still a valid checkpoint


def test_out_holding_an_input_is_refused(parent):
    out = parent.parent
    with pytest.raises(PrismError, match="contains the input checkpoint"):
        open_output(str(out), "sft", dict(CONFIG, out=str(out)), [("data", resolve(str(parent)))], overwrite=True)
    assert (parent / MANIFEST).is_file()


def test_same_out_from_an_unrelated_parent_is_fine(parent, tmp_path):
    run = open_output(str(tmp_path / "next"), "sft", dict(CONFIG), [("policy", resolve(str(parent)))])
    assert run.path.is_dir()


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from stages.common.contract.checkpoint import open_output
run = open_output({out!r}, "sft", {{"seed": 0}}, [])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_even_with_resume(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (False, True):
            with pytest.raises(PrismError, match=f"another prism process \\(pid {holder.pid}"):
                checkpoint.check_output(str(out), "sft", {"seed": 0}, resume=resume)
            with pytest.raises(PrismError, match="another prism process"):
                open_output(str(out), "sft", {"seed": 0}, [], resume=resume)
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is stale, and the interrupted run resumes
    run = open_output(str(out), "sft", {"seed": 0}, [], resume=True)
    assert run.resuming
    assert json.loads((out / LOCK).read_text())["pid"] != holder.pid
    run.finalize()
    assert not (out / LOCK).exists() and LOCK not in json.loads((out / MANIFEST).read_text())["files"]


def test_a_stale_lock_file_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere"}))
    run = open_output(str(out), "sft", {"seed": 0}, [])
    assert not run.resuming and (out / checkpoint.RUN_MARKER).is_file()


def test_resume_accepts_safe_changes_and_names_the_unsafe_one(tmp_path, capsys):
    out = tmp_path / "run"
    config = {"steps": 10, "save_every": 5, "report_to": "none", "lr": 1e-5, "data": ["synth"], "resume": False}
    open_output(str(out), "rl", config, [])
    extended = dict(config, steps=20, save_every=2, report_to="tensorboard", resume=True)
    assert open_output(str(out), "rl", extended, [], resume=True).resuming
    assert "steps 10 -> 20" in capsys.readouterr().err
    with pytest.raises(PrismError, match=r"differs from the interrupted run in data \(\['synth'\] -> \['x'\]\)"):
        open_output(str(out), "rl", dict(extended, data=["x"]), [], resume=True)


def test_resume_on_a_device_that_resolves_the_discriminator_settings_otherwise(tmp_path, capsys):
    """align's --disc-grad-checkpointing/--disc-layout auto resolve from the device's memory: an 80 GB run
    resumed on a CPU (or a bigger GPU) resolves them differently, with the same maths."""
    out = tmp_path / "run"
    config = {"steps": 10, "lr": 1e-6, "disc_gradient_checkpointing": "on", "disc_layout": "shared", "resume": False}
    open_output(str(out), "align", config, [])
    elsewhere = dict(config, disc_gradient_checkpointing="off", disc_layout="prefix", resume=True)
    assert open_output(str(out), "align", elsewhere, [], resume=True).resuming
    err = capsys.readouterr().err
    assert "disc_layout 'shared' -> 'prefix'" in err and err.count("resuming") == 1, err   # said once


def test_ctrl_c_while_finalizing_keeps_the_state_for_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run = open_output(str(out), "sft", {"seed": 0}, [])
    run.state_dir.mkdir()
    (run.state_dir / "trainer_state.json").write_text('{"step": 7}')
    (run.path / "model").mkdir()
    (run.path / "model" / "w.bin").write_bytes(b"w")

    def interrupted(path, chunk=0):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "sha256_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.finalize()
    assert not (out / MANIFEST).exists() and (out / "state" / "trainer_state.json").is_file()
    monkeypatch.undo()
    again = open_output(str(out), "sft", {"seed": 0}, [], resume=True)
    assert again.resuming
    again.finalize()
    assert "state/trainer_state.json" not in json.loads((out / MANIFEST).read_text())["files"]
    assert not (out / "state").exists()


# ---- issue 33: --overwrite replaces only a run of the same stage (or an empty folder)

def test_overwrite_never_deletes_a_folder_of_the_users_files(tmp_path):
    from tests.test_checkpoint import snapshot

    mine = tmp_path / "mine"
    (mine / "figs").mkdir(parents=True)
    (mine / "thesis.tex").write_text("precious")
    (mine / "figs" / "a.png").write_bytes(b"png")
    before = snapshot(mine)
    for call in (lambda: checkpoint.check_output(str(mine), "sft", CONFIG, overwrite=True),
                 lambda: open_output(str(mine), "sft", CONFIG, [], overwrite=True)):
        with pytest.raises(PrismError) as e:
            call()
        assert e.value.message.startswith(f"--out {mine} is a non-empty directory that is not a prism run")
        assert "--overwrite" not in (e.value.hint or "")
    assert snapshot(mine) == before
    # the refusal without --overwrite no longer suggests it either
    with pytest.raises(PrismError) as e:
        open_output(str(mine), "sft", CONFIG, [])
    assert "--overwrite" not in (e.value.hint or "")


@pytest.mark.parametrize("complete", [True, False])
def test_overwrite_refuses_a_run_of_another_stage(tmp_path, complete):
    from tests.test_checkpoint import make_ckpt, snapshot

    out = tmp_path / "run"
    if complete:
        make_ckpt(out, stage="align")
    else:
        open_output(str(out), "align", CONFIG, [])
        checkpoint.release_lock(out)
    before = snapshot(out)
    with pytest.raises(PrismError, match="'align' .*--overwrite only replaces a 'rl' run"):
        open_output(str(out), "rl", CONFIG, [], overwrite=True)
    assert snapshot(out) == before
    # the same stage is replaced, and an empty folder is used
    assert not open_output(str(out), "align", CONFIG, [], overwrite=True).resuming
    empty = tmp_path / "empty"
    empty.mkdir()
    assert open_output(str(empty), "rl", CONFIG, [], overwrite=True).path == empty


def test_resume_with_overwrite_is_refused_before_anything_is_lost(tmp_path):
    from stages.common.contract.errors import UsageError
    from tests.test_checkpoint import snapshot

    out = tmp_path / "run"
    run = open_output(str(out), "sft", CONFIG, [])
    run.state_dir.mkdir()
    (run.state_dir / "step.json").write_text('{"step": 150}')
    checkpoint.release_lock(out)
    before = snapshot(out)
    with pytest.raises(UsageError, match="--resume and --overwrite contradict each other"):
        open_output(str(out), "sft", CONFIG, [], overwrite=True, resume=True)
    assert snapshot(out) == before


def test_cli_overwrite_in_a_folder_of_the_users_files_keeps_them(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prism_cli.app import app

    (tmp_path / "thesis.tex").write_text("precious")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sft", "--ckpt", "tiny", "--data", "synth:train:8", "--max-steps", "1",
                                      "--batch-size", "4", "--micro-batch-size", "4", "--out", ".", "--overwrite"])
    assert result.exit_code == 1, result.output
    assert "not a prism run" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "precious"



def test_export_overwrite_replaces_only_an_export(tmp_path):
    from stages.export import model_card
    from stages.export.run import check_output as check_export_out
    from tests.test_checkpoint import snapshot

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(PrismError, match="not a prism export; --overwrite will not delete it") as e:
        check_export_out(mine, overwrite=True)
    assert "--overwrite" not in e.value.hint and snapshot(mine) == {"thesis.tex": b"precious"}
    done = tmp_path / "hf"
    done.mkdir()
    (done / model_card.LINEAGE_FILE).write_text("{}")
    (done / "config.json").write_text("{}")
    with pytest.raises(PrismError, match="already holds an export") as e:
        check_export_out(done, overwrite=False)
    assert "--overwrite" in e.value.hint
    check_export_out(done, overwrite=True)  # an earlier export is what --overwrite replaces


def test_a_checkpoint_still_being_written_is_in_progress_not_interrupted(tmp_path):
    out = tmp_path / "rl"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=str(out))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PrismError, match=f"is still being written by a prism run \\(pid {holder.pid}") as e:
            resolve(str(out))
        assert "interrupted" not in e.value.message and "--resume" not in e.value.hint
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(PrismError, match="its run was interrupted"):   # its writer died
        resolve(str(out))


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_saved_private_get_the_mode_the_umask_gives(tmp_path, umask, want):
    """transformers saves safetensors through a 0600 temp file: a labmate could not read the weights."""
    import os
    import stat

    old = os.umask(umask)
    try:
        run = open_output(str(tmp_path / "sft"), "sft", CONFIG, [])
        run.model_dir.mkdir()
        weights = run.model_dir / "model.safetensors"
        weights.write_bytes(b"w")
        os.chmod(weights, 0o600)
        run.finalize()
    finally:
        os.umask(old)
    assert stat.S_IMODE(weights.stat().st_mode) == want
    assert load_manifest_files(tmp_path / "sft") == ["model/model.safetensors"]


def load_manifest_files(path):
    return sorted(json.loads((path / MANIFEST).read_text())["files"])
