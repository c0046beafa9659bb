"""--out safety (issue 19): an --out that is, lies inside or holds an input checkpoint is refused before
anything is deleted; one writer per --out (an exclusive lock; a stale lock of a dead process is taken over)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prism_cli import checkpoint
from prism_cli.checkpoint import LOCK, MANIFEST, open_output, resolve
from prism_cli.errors import PrismError
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
from prism_cli.checkpoint import open_output
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
