"""The `prism` command line: help, version, one-line errors with the right exit code, nothing written on
refusal, config resolution through the CLI (--dry-run), `prism inspect`.

Most run in-process through typer's CliRunner; a few through a real `python -m prism_cli` subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prism_cli.app import STAGES, app
from stages.common.contract import __version__, checkpoint, console
from stages.common.contract.checkpoint import MANIFEST, open_output
from stages.common.contract.config import resolve, to_dict
from stages.sft.config import SFTConfig

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {**{name: desc for name, (_, _, desc) in STAGES.items()},
            "inspect": "Show a checkpoint's stage, lineage, config highlights and metrics."}


@pytest.fixture
def wide():
    """prism's own results console, made wide so a table cell is not wrapped mid-value."""
    old = console.out._width
    console.out.width = 300
    yield
    console.out._width = old


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code: int, *needles: str) -> str:
    """The result failed with `code` and exactly one stderr line `error: ...` containing every needle."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(path: Path) -> dict | None:
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory, tiny_path) -> Path:
    """A complete 'sft' checkpoint whose model/ is the tiny model (written through the contract)."""
    path = tmp_path_factory.mktemp("ckpts") / "sft"
    cfg = to_dict(resolve(SFTConfig, flags={"out": str(path), "lr": 3e-4}))
    run = open_output(str(path), "sft", cfg, [checkpoint.resolve("tiny")])
    shutil.copytree(tiny_path, run.model_dir, ignore=shutil.ignore_patterns(".complete"))
    run.log_metrics({"step": 1, "loss": 3.0})
    return run.finalize(summary={"final_loss": 2.5, "steps": 1})


@pytest.fixture
def sft_copy(sft_ckpt, tmp_path) -> Path:
    dst = tmp_path / "sft-copy"
    shutil.copytree(sft_ckpt, dst)
    return dst


def sft_args(ckpt, out, *more):
    return ["sft", "--ckpt", ckpt, "--data", "synth:train:16", "--batch-size", "8", "--micro-batch-size", "8",
            "--out", out, *more]


# ---------------------------------------------------------------------------------------- help, version

def test_root_help_lists_every_command():
    r = invoke("--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.replace("│", " ").split())
    for name, desc in COMMANDS.items():
        assert f" {name} " in text, name
        assert " ".join(desc.split()[:4]) in text, desc  # its one-line description


def test_no_arguments_shows_help():
    r = invoke()
    assert "Commands" in r.output and "curate" in r.output and "Traceback" not in r.output


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"prism {__version__}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.stdout and "Traceback" not in r.output
    if command != "inspect":
        for flag in ("--config", "--set", "--out", "--dry-run", "--overwrite", "--resume"):
            assert flag in r.stdout, (command, flag)
    else:
        assert "--verify" in r.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_flags_match_config_fields(stage):
    """Every CLI field of the stage's Config is a flag; cli=False fields only through YAML/--set."""
    import dataclasses
    import importlib

    import typer.main

    module, _, name = STAGES[stage][0].partition(":")
    cls = getattr(importlib.import_module(module), name)
    params = {p.name: p for p in typer.main.get_command(app).commands[stage].params}
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
        negative = flag.replace("--", "--no-", 1)
        # a switch comes in the forms that change its default, each its own option (80-column --help):
        # on by default -> --no-x only; off -> --x only; decided by other options (None) -> both
        is_switch = isinstance(f.default, bool) or f.name == "dynamic_sampling"
        has_positive = not (is_switch and f.default is True)
        has_negative = is_switch and f.default is not False
        assert (f.name in params) == (f.metadata.get("cli", True) and has_positive), f.name
        assert (f.name + "__no" in params) == (f.metadata.get("cli", True) and has_negative), f.name
        if f.name in params:
            assert params[f.name].opts == [flag] and not params[f.name].secondary_opts, f.name
        if f.name + "__no" in params:
            assert params[f.name + "__no"].opts == [negative], f.name


def test_help_does_not_render_emoji():
    r = invoke("sft", "--help")
    assert "\U0001f68b" not in r.stdout  # :train: in synth:train:N


# ------------------------------------------------------------------------------- one-line refusals

def test_nonexistent_ckpt(tmp_path):
    out = tmp_path / "out"
    one_error_line(invoke(*sft_args(tmp_path / "nope", out)), 1, f"--ckpt {tmp_path / 'nope'} does not exist")
    assert not out.exists()


def test_directory_without_manifest(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("a")
    out = tmp_path / "out"
    one_error_line(invoke(*sft_args(tmp_path / "junk", out)), 1, str(tmp_path / "junk"), "no prism.json")
    assert not out.exists()


def test_incomplete_checkpoint(tmp_path):
    partial = tmp_path / "partial"
    open_output(str(partial), "sft", {"lr": 1.0}, [])
    out = tmp_path / "out"
    one_error_line(invoke(*sft_args(partial, out)), 1, f"{partial} is an incomplete checkpoint")
    assert not out.exists()


def test_checkpoint_file_edited_after_writing(sft_copy, tmp_path):
    with open(sft_copy / "model" / "config.json", "a") as f:
        f.write("\n")
    out = tmp_path / "out"
    one_error_line(invoke(*sft_args(sft_copy, out)), 1, str(sft_copy),
                   "model/config.json does not match its checksum")
    assert not out.exists()


def test_manifest_edited_by_hand(sft_copy, tmp_path):
    m = json.loads((sft_copy / MANIFEST).read_text())
    m["config"]["lr"] = 1.0
    (sft_copy / MANIFEST).write_text(json.dumps(m))
    out = tmp_path / "out"
    one_error_line(invoke(*sft_args(sft_copy, out)), 1, f"{sft_copy / MANIFEST} does not match its own checksum")
    assert not out.exists()


def test_wrong_stage_input(tmp_path):
    ev = tmp_path / "eval-run"
    open_output(str(ev), "eval", {}, []).finalize()
    out = tmp_path / "out"
    one_error_line(invoke(*sft_args(ev, out)), 1, f"--ckpt {ev} is a 'eval' checkpoint")
    assert not out.exists()


def test_bad_data_source(tmp_path):
    out = tmp_path / "out"
    r = invoke("sft", "--ckpt", "tiny", "--data", tmp_path / "nope.parquet", "--out", out)
    line = one_error_line(r, 1, str(tmp_path / "nope.parquet"))
    assert "synth[:train:N]" in line  # the hint's spec is printed as written, not as an emoji
    assert not out.exists()


@pytest.mark.parametrize("case", ["set_unknown", "set_type", "flag_type", "flag_unknown", "yaml_type",
                                  "yaml_unknown", "yaml_malformed", "yaml_missing", "set_no_equals"])
def test_usage_errors_exit_2(tmp_path, case):
    y = tmp_path / "c.yaml"
    extra, needles = {
        "set_unknown": (["--set", "bogus_key=1"], ["unknown config key 'bogus_key' in --set"]),
        "set_type": (["--set", "lr=fast"], ["config key 'lr' expects a number, got 'fast'"]),
        "flag_type": (["--max-steps", "many"], ["'--max-steps'", "integer"]),
        "flag_unknown": (["--learning-rate", "1"], ["No such option: --learning-rate"]),
        "yaml_type": (["--config", y], ["config key 'batch_size' expects an integer, got 'big'"]),
        "yaml_unknown": (["--config", y], ["unknown config key 'learning_rate'", str(y)]),
        "yaml_malformed": (["--config", y], [f"malformed YAML in {y} at line "]),
        "yaml_missing": (["--config", tmp_path / "missing.yaml"], ["config file not found"]),
        "set_no_equals": (["--set", "lr"], ["--set expects key=value"]),
    }[case]
    y.write_text({"yaml_type": "batch_size: big\n", "yaml_unknown": "learning_rate: 0.1\n",
                  "yaml_malformed": "lr: 0.1\ndata: [synth\n"}.get(case, "lr: 0.1\n"))
    out = tmp_path / "out"
    one_error_line(invoke("sft", "--ckpt", "tiny", "--out", out, *extra), 2, *needles)
    assert not out.exists()


# --------------------------------------------------------------------------- existing --out directories

def test_complete_out_refused_without_overwrite(sft_copy):
    before = snapshot(sft_copy)
    one_error_line(invoke(*sft_args("tiny", sft_copy)), 1, f"--out {sft_copy} already holds a complete 'sft'",
                   "--overwrite")
    assert snapshot(sft_copy) == before


def test_partial_out_refused_without_resume(tmp_path):
    out = tmp_path / "out"
    run = open_output(str(out), "sft", {"lr": 1.0}, [])
    run.state_dir.mkdir()
    before = snapshot(out)
    one_error_line(invoke(*sft_args("tiny", out)), 1, f"--out {out} holds an interrupted run", "--resume")
    assert snapshot(out) == before


def test_resume_with_other_options_names_the_keys(tmp_path):
    out = tmp_path / "out"
    flags = {"ckpt": "tiny", "data": ["synth:train:16"], "batch_size": 8, "micro_batch_size": 8, "out": str(out)}
    open_output(str(out), "sft", to_dict(resolve(SFTConfig, flags=flags)), []).state_dir.mkdir()
    before = snapshot(out)
    r = invoke(*sft_args("tiny", out, "--resume", "--lr", "0.5", "--set", "max_length=64"))
    one_error_line(r, 1, f"cannot resume {out}: config differs from the interrupted run in lr (", "max_length (")
    assert snapshot(out) == before


def test_foreign_out_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("keep me")
    one_error_line(invoke(*sft_args("tiny", out)), 1, f"--out {out} is a non-empty directory that is not a prism run")
    assert snapshot(out) == {"notes.md": b"keep me"}


# ------------------------------------------------------------------------- config order through the CLI

def test_dry_run_resolution_order(tmp_path, wide):
    y = tmp_path / "sft.yaml"
    y.write_text("lr: 0.5\nbatch_size: 16\nmicro_batch_size: 4\nschedule: linear\nmax_length: 1024\n")
    out = tmp_path / "out"
    r = invoke("sft", "--dry-run", "--ckpt", "tiny", "--data", "synth:train:64", "--data", "synth:test:8",
               "--config", y, "--lr", "0.25", "--batch-size", "8", "--set", "lr=0.125", "--set", "max_pixels=none",
               "--out", out)
    assert r.exit_code == 0, r.output
    assert "AdamW lr 0.125 linear" in r.stdout            # --set > flag > YAML; YAML > default
    assert "batch 8, micro-batch 4" in r.stdout            # flag > YAML; YAML > default
    assert "max_length 1024" in r.stdout
    assert "synth:train:64 (64), synth:test:8 (8)" in r.stdout  # both --data values, no emoji
    assert "tiny (tiny base model)" in r.stdout
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_on_a_prism_checkpoint(sft_ckpt, tmp_path, wide):
    r = invoke("sft", "--dry-run", "--ckpt", sft_ckpt, "--data", "synth:train:16", "--batch-size", "8",
               "--set", "data=[synth:train:16, synth:test:8]")
    assert r.exit_code == 0, r.output
    assert f"{sft_ckpt} (sft)" in r.stdout and "synth:test:8 (8)" in r.stdout


# ------------------------------------------------------------------------------------------- inspect

def test_inspect_shows_stage_lineage_config_metrics(sft_ckpt, wide):
    r = invoke("inspect", sft_ckpt)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "stage" in out and "sft" in out
    assert "lineage" in out and "tiny" in out and "base" in out
    assert "config highlights" in out and "0.0003" in out      # lr
    assert "final_loss" in out and "2.5" in out
    assert "NO / missing" not in out


def test_inspect_verify(sft_copy, monkeypatch, wide):
    r = invoke("inspect", "--verify", sft_copy)
    n = len(checkpoint.load_manifest(sft_copy)["files"])
    assert r.exit_code == 0 and f"verified {n} files" in r.stdout
    # a same-size change in a big file passes the cheap open check; --verify re-hashes and catches it
    monkeypatch.setattr(checkpoint, "QUICK_HASH_LIMIT", 0)
    w = sft_copy / "model" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert invoke("inspect", sft_copy).exit_code == 0
    one_error_line(invoke("inspect", "--verify", sft_copy), 1, "model/model.safetensors: sha256 mismatch")


def test_inspect_refusals(tmp_path, tiny_path):
    one_error_line(invoke("inspect", tmp_path / "nope"), 1, "does not exist")
    one_error_line(invoke("inspect", tiny_path), 1, "not a prism checkpoint")


# ---------------------------------------------------------------------------------- real subprocesses

def prism(*args, cwd=REPO):
    env = dict(os.environ, PRISM_NO_PROGRESS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "prism_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_subprocess_help_and_version():
    r = prism("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"prism {__version__}"
    r = prism("--help")
    assert r.returncode == 0 and all(name in r.stdout for name in COMMANDS)


@pytest.mark.parametrize("case", ["ckpt", "set", "flag", "yaml"])
def test_subprocess_errors_are_one_line(tmp_path, case):
    y = tmp_path / "bad.yaml"
    y.write_text("lr: [0.1\n")
    out = tmp_path / "out"
    args, code, needle = {
        "ckpt": (["--ckpt", tmp_path / "missing"], 1, "does not exist"),
        "set": (["--set", "nope=1"], 2, "unknown config key 'nope'"),
        "flag": (["--lr", "fast"], 2, "--lr"),
        "yaml": (["--config", y], 2, "malformed YAML"),
    }[case]
    r = prism("sft", "--out", out, *args)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not out.exists()
