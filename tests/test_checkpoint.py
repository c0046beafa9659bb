"""The checkpoint-directory contract (stages.common.contract.checkpoint, docs/design.md).

Manifest written last and atomically, with sizes + sha256, parents with fingerprints, resolved config and
versions; refusal of incomplete, corrupt and wrong-stage inputs; overwrite/resume rules; main process only;
secrets scrubbed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from stages.common.contract import checkpoint
from stages.common.contract.checkpoint import MANIFEST, RUN_MARKER, open_output, resolve
from stages.common.contract.errors import PrismError, UsageError

CONFIG = {"ckpt": "tiny", "data": ["synth:train:8"], "lr": 1e-5, "seed": 0, "out": "", "resume": False,
          "overwrite": False, "dry_run": False, "max_new_tokens": 64}


def make_ckpt(path: Path, stage: str = "sft", config: dict | None = None, parents=(), keep_state=False,
              summary=None) -> Path:
    """A small complete checkpoint written through the contract."""
    run = open_output(str(path), stage, dict(config or CONFIG, out=str(path)), list(parents))
    run.model_dir.mkdir()
    (run.model_dir / "config.json").write_text('{"model_type": "fake"}')
    (run.model_dir / "weights.bin").write_bytes(bytes(range(256)) * 4)
    run.state_dir.mkdir()
    (run.state_dir / "optimizer.pt").write_bytes(b"state")
    run.log_metrics({"step": 1, "loss": 2.0})
    run.log_metrics({"step": 2, "loss": 1.0})
    return run.finalize(summary=summary or {"final_loss": 1.0}, data={"synth:train:8": "abc"},
                        keep_state=keep_state)


def snapshot(path: Path) -> dict:
    """Every file under path with its bytes (to show a refusal changed nothing)."""
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def rewrite_manifest(path: Path, edit, rehash: bool) -> None:
    m = json.loads((path / MANIFEST).read_text())
    edit(m)
    if rehash:
        body = {k: v for k, v in m.items() if k != "self_sha256"}
        m["self_sha256"] = hashlib.sha256(checkpoint._canonical(body)).hexdigest()
    (path / MANIFEST).write_text(json.dumps(m, indent=1, sort_keys=True))


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_ckpt(tmp_path / "sft")


# ------------------------------------------------------------------------------------------- writing

def test_manifest_contents(tmp_path):
    parent = make_ckpt(tmp_path / "parent", stage="curate")
    parent_spec = resolve(str(parent))
    out = make_ckpt(tmp_path / "child", parents=[("data", parent_spec)])
    m = json.loads((out / MANIFEST).read_text())
    assert m["format_version"] == checkpoint.FORMAT_VERSION
    assert m["stage"] == "sft"
    assert m["created"].endswith("+00:00")
    assert m["versions"]["prism"] and m["versions"]["python"] and "torch" in m["versions"]
    assert m["config"]["lr"] == 1e-5 and m["config"]["data"] == ["synth:train:8"]
    assert m["data"] == {"synth:train:8": "abc"}
    assert m["summary"] == {"final_loss": 1.0}
    [p] = m["parents"]
    assert p == {"role": "data", "ref": str(parent), "kind": "prism", "stage": "curate", "relative": "../parent",
                 "fingerprint": hashlib.sha256((parent / MANIFEST).read_bytes()).hexdigest()}
    # every file but the manifest and run marker, with its true size and sha256; state/ dropped by default
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(m["files"]) == on_disk == ["metrics.jsonl", "model/config.json", "model/weights.bin"]
    for rel, info in m["files"].items():
        data = (out / rel).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not (out / RUN_MARKER).exists()
    assert not (out / "state").exists()
    body = {k: v for k, v in m.items() if k != "self_sha256"}
    assert m["self_sha256"] == hashlib.sha256(checkpoint._canonical(body)).hexdigest()


def test_keep_state_keeps_and_hashes_state(tmp_path):
    out = make_ckpt(tmp_path / "run", keep_state=True)
    m = checkpoint.load_manifest(out)
    assert "state/optimizer.pt" in m["files"]


def test_tiny_parent_fingerprint(tmp_path):
    from stages.common.world import tiny
    out = make_ckpt(tmp_path / "run", parents=[resolve("tiny")])
    [p] = checkpoint.load_manifest(out)["parents"]
    assert p["role"] == "policy" and p["kind"] == "tiny" and p["stage"] == "base"
    assert p["fingerprint"] == f"tiny:{tiny.build_key('tiny')}"


def test_manifest_is_written_last_and_atomically(tmp_path, monkeypatch):
    """If the final rename fails the directory is still a partial run: no prism.json, marker kept."""
    run = open_output(str(tmp_path / "run"), "sft", CONFIG, [])
    (run.path / "metrics.jsonl").write_text("{}\n")
    real_replace = os.replace
    seen = []

    def failing_replace(src, dst):
        seen.append(sorted(p.name for p in Path(dst).parent.iterdir()))
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError):
        run.finalize()
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert MANIFEST + ".tmp" in seen[0] and MANIFEST not in seen[0]
    assert not (run.path / MANIFEST).exists()
    assert (run.path / RUN_MARKER).exists()
    with pytest.raises(PrismError, match="incomplete checkpoint"):
        resolve(str(run.path))
    # a retry succeeds and the leftover .tmp never becomes a listed file
    run.finalize()
    m = checkpoint.load_manifest(run.path)
    assert list(m["files"]) == ["metrics.jsonl"]


def test_manifest_with_json_lossy_values_reads_back(tmp_path):
    """int keys (pass@k by k), tuples, Paths, numpy ints: the self-checksum covers what a reader loads."""
    import numpy as np

    run = open_output(str(tmp_path / "run"), "eval", dict(CONFIG, shape=(2, 3)), [])
    run.finalize(summary={"pass_at": {2: 0.5, 10: 0.75}, "n": np.int64(3), "where": tmp_path},
                 data={1: "a", "b": 2})
    m = resolve(str(run.path)).manifest
    assert m["summary"]["pass_at"] == {"2": 0.5, "10": 0.75} and m["config"]["shape"] == [2, 3]
    assert m["summary"]["n"] == "3" and m["summary"]["where"] == str(tmp_path)


def test_metrics_log_and_truncate(tmp_path):
    run = open_output(str(tmp_path / "run"), "rl", CONFIG, [])
    for step in range(1, 6):
        run.log_metrics({"step": step, "reward": step / 10})
    run.truncate_metrics(3)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]


# ------------------------------------------------------------------------------------------- reading

def test_resolve_complete_checkpoint(ckpt):
    spec = resolve(str(ckpt))
    assert spec.kind == "prism" and spec.stage == "sft" and spec.path == ckpt
    assert spec.model_path == str(ckpt / "model")
    assert spec.fingerprint == hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()
    assert checkpoint.verify_files(ckpt) == []


def test_resolve_tiny_hf_and_hub(tmp_path):
    assert resolve("tiny").kind == "tiny" and resolve("tiny-moe").stage == "base"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    spec = resolve(str(hf))
    assert spec.kind == "hf" and spec.model_path == str(hf)
    assert spec.fingerprint.startswith("config:")
    hub = resolve("Qwen/Qwen3-VL-4B-Instruct")  # no network: only recorded
    assert hub.kind == "hub" and hub.model_path == "Qwen/Qwen3-VL-4B-Instruct"


def test_resolve_empty_spec_is_a_usage_error():
    with pytest.raises(UsageError, match="--ckpt is required"):
        resolve("")


def test_nonexistent(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(PrismError) as e:
        resolve(str(missing))
    assert e.value.message == f"--ckpt {missing} does not exist" and e.value.exit_code == 1
    with pytest.raises(PrismError, match="--ckpt ./not/here does not exist"):
        resolve("./not/here")


def test_directory_without_manifest(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(PrismError, match=r"is neither a prism checkpoint \(no prism.json\) nor a Hugging Face"):
        resolve(str(tmp_path / "junk"))


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PrismError, match="is a file, not a checkpoint directory"):
        resolve(str(tmp_path / "f"))


@pytest.mark.parametrize("mark", ["marker", "state"])
def test_incomplete_checkpoint_is_refused(tmp_path, mark):
    d = tmp_path / "partial"
    if mark == "marker":
        open_output(str(d), "sft", CONFIG, [])
    else:
        (d / "state").mkdir(parents=True)
    (d / "config.json").write_text("{}")  # even if it also looks like an HF dir
    with pytest.raises(PrismError) as e:
        resolve(str(d), role="--data")
    assert e.value.message == f"--data {d} is an incomplete checkpoint (no prism.json): its run was interrupted"
    assert "--resume" in e.value.hint


def test_file_edited_after_writing(ckpt):
    (ckpt / "model" / "config.json").write_text('{"model_type": "edit"}')  # same size, other bytes
    with pytest.raises(PrismError) as e:
        resolve(str(ckpt))
    assert e.value.message == f"checkpoint {ckpt}: model/config.json does not match its checksum in prism.json"


def test_file_grown_or_deleted(ckpt):
    with open(ckpt / "metrics.jsonl", "a") as f:
        f.write('{"step": 3}\n')
    with pytest.raises(PrismError, match="metrics.jsonl does not match its checksum"):
        resolve(str(ckpt))
    (ckpt / "metrics.jsonl").unlink()
    with pytest.raises(PrismError, match=f"checkpoint {ckpt} is missing metrics.jsonl"):
        resolve(str(ckpt))


def test_large_files_get_a_size_check_on_open_and_a_hash_on_verify(ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint, "QUICK_HASH_LIMIT", 0)
    w = ckpt / "model" / "weights.bin"
    w.write_bytes(bytes(reversed(w.read_bytes())))  # same size
    resolve(str(ckpt))  # opening stays cheap for big files
    assert checkpoint.verify_files(ckpt) == ["model/weights.bin: sha256 mismatch"]
    assert checkpoint.verify_files(ckpt, full=False) == []


def test_manifest_edited_by_hand(ckpt):
    rewrite_manifest(ckpt, lambda m: m["config"].update(lr=1.0), rehash=False)
    with pytest.raises(PrismError) as e:
        resolve(str(ckpt))
    assert e.value.message == f"{ckpt / MANIFEST} does not match its own checksum: it was edited or corrupted"


def test_manifest_file_list_edited_by_hand(ckpt):
    """Dropping a file from the list (to hide a change) is caught by the self-checksum too."""
    rewrite_manifest(ckpt, lambda m: m["files"].pop("model/weights.bin"), rehash=False)
    with pytest.raises(PrismError, match="does not match its own checksum"):
        resolve(str(ckpt))


@pytest.mark.parametrize("content,expect", [
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    ("[1, 2]", "is not a prism manifest"),
    ('{"stage": "sft"}', "is not a prism manifest"),
])
def test_corrupt_manifest(ckpt, content, expect):
    mpath = ckpt / MANIFEST
    mpath.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PrismError, match=expect):
        resolve(str(ckpt))


def test_future_format_and_unknown_stage(ckpt):
    rewrite_manifest(ckpt, lambda m: m.update(format_version=99), rehash=True)
    with pytest.raises(PrismError, match="has format version 99, this prism reads version 1"):
        resolve(str(ckpt))
    rewrite_manifest(ckpt, lambda m: m.update(format_version=1, stage="pretrain"), rehash=True)
    with pytest.raises(PrismError, match="names an unknown stage 'pretrain'"):
        resolve(str(ckpt))


def test_wrong_stage_is_refused(tmp_path):
    ev = make_ckpt(tmp_path / "ev", stage="eval")
    spec = resolve(str(ev))
    with pytest.raises(PrismError) as e:
        checkpoint.require_stage(spec, ("base", "sft", "align", "rl"))
    assert e.value.message == f"--ckpt {ev} is a 'eval' checkpoint; this stage needs 'base' or 'sft' or 'align' or 'rl'"
    assert checkpoint.require_stage(resolve("tiny"), ("base", "sft")).kind == "tiny"


def test_lineage_walks_back_and_checks_fingerprints(tmp_path):
    sft = make_ckpt(tmp_path / "sft", parents=[resolve("tiny")])
    rl = make_ckpt(tmp_path / "rl", stage="rl", parents=[("policy", resolve(str(sft)))])
    chain = checkpoint.lineage(resolve(str(rl)))
    assert [(c["stage"], c["ref"], c["ok"]) for c in chain] == [("rl", str(rl), True), ("sft", str(sft), True),
                                                                ("base", "tiny", True)]
    # the parent is re-made: same path, other manifest -> the child's record no longer matches
    run = open_output(str(sft), "sft", dict(CONFIG, lr=2e-5), [resolve("tiny")], overwrite=True)
    run.finalize()
    chain = checkpoint.lineage(resolve(str(rl)))
    assert chain[1]["ref"] == str(sft) and chain[1]["ok"] is False


def test_lineage_with_a_missing_parent(tmp_path):
    sft = make_ckpt(tmp_path / "sft", parents=[resolve("tiny")])
    rl = make_ckpt(tmp_path / "rl", stage="rl", parents=[("policy", resolve(str(sft)))])
    shutil.rmtree(sft)
    chain = checkpoint.lineage(resolve(str(rl)))
    assert len(chain) == 2 and chain[1]["ok"] is False


# ------------------------------------------------------------------------------ overwrite and resume

def test_new_and_empty_out_are_fine(tmp_path):
    run = open_output(str(tmp_path / "a" / "b"), "sft", CONFIG, [])
    assert run.path.is_dir() and (run.path / RUN_MARKER).is_file() and not run.resuming
    (tmp_path / "empty").mkdir()
    assert open_output(str(tmp_path / "empty"), "sft", CONFIG, []).path.is_dir()


def test_out_is_required():
    with pytest.raises(UsageError, match="--out is required"):
        open_output("", "sft", CONFIG, [])


def test_complete_dir_refused_without_overwrite(ckpt):
    before = snapshot(ckpt)
    with pytest.raises(PrismError) as e:
        open_output(str(ckpt), "sft", CONFIG, [])
    assert e.value.message == f"--out {ckpt} already holds a complete 'sft' checkpoint"
    assert "--overwrite" in e.value.hint
    with pytest.raises(PrismError) as e:  # another stage's checkpoint: --overwrite would not replace it
        open_output(str(ckpt), "rl", CONFIG, [])
    assert "--overwrite" not in e.value.hint
    with pytest.raises(PrismError, match="already holds a complete"):
        open_output(str(ckpt), "sft", CONFIG, [], resume=True)  # nothing to resume in a finished run
    assert snapshot(ckpt) == before


def test_overwrite_replaces_a_complete_dir(ckpt):
    run = open_output(str(ckpt), "sft", CONFIG, [], overwrite=True)
    assert sorted(p.name for p in ckpt.iterdir() if p.name != checkpoint.LOCK) == [RUN_MARKER] and not run.resuming


def test_partial_dir_refused_without_resume(tmp_path):
    d = tmp_path / "run"
    run = open_output(str(d), "sft", CONFIG, [])
    run.state_dir.mkdir()
    (run.state_dir / "step.json").write_text('{"step": 3}')
    before = snapshot(d)
    with pytest.raises(PrismError) as e:
        open_output(str(d), "sft", CONFIG, [])
    assert e.value.message == f"--out {d} holds an interrupted run"
    assert "--resume" in e.value.hint and "--overwrite" in e.value.hint
    assert snapshot(d) == before


def test_resume_same_config(tmp_path):
    d = tmp_path / "run"
    run = open_output(str(d), "sft", CONFIG, [])
    run.state_dir.mkdir()
    (run.state_dir / "step.json").write_text('{"step": 3}')
    marker = (d / RUN_MARKER).read_bytes()
    # resume/overwrite/dry_run are how to run, not what: they may differ
    again = open_output(str(d), "sft", dict(CONFIG, resume=True), [], resume=True)
    assert again.resuming and (d / "state" / "step.json").is_file() and (d / RUN_MARKER).read_bytes() == marker


def test_resume_with_a_different_config_names_the_keys(tmp_path):
    d = tmp_path / "run"
    open_output(str(d), "sft", CONFIG, [])
    before = snapshot(d)
    with pytest.raises(PrismError) as e:
        open_output(str(d), "sft", dict(CONFIG, lr=1e-4, seed=1, resume=True), [], resume=True)
    assert e.value.message == (f"cannot resume {d}: config differs from the interrupted run in "
                               f"lr (1e-05 -> 0.0001), seed (0 -> 1)")
    assert snapshot(d) == before


def test_resume_a_partial_run_of_another_stage(tmp_path):
    d = tmp_path / "run"
    open_output(str(d), "align", CONFIG, [])
    with pytest.raises(PrismError, match=f"--out {d} holds a partial 'align' run, not 'rl'"):
        open_output(str(d), "rl", CONFIG, [], resume=True)


def test_overwrite_restarts_a_partial_run(tmp_path):
    d = tmp_path / "run"
    run = open_output(str(d), "sft", CONFIG, [])
    run.state_dir.mkdir()
    run2 = open_output(str(d), "sft", dict(CONFIG, lr=1.0), [], overwrite=True)
    assert not run2.resuming and not (d / "state").exists()
    assert json.loads((d / RUN_MARKER).read_text())["config"]["lr"] == 1.0


def test_foreign_non_empty_dir_refused(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    for kwargs in ({}, {"resume": True}):
        with pytest.raises(PrismError) as e:
            open_output(str(d), "sft", CONFIG, [], **kwargs)
        assert e.value.message == f"--out {d} is a non-empty directory that is not a prism run"
    assert snapshot(d) == {"thesis.tex": b"precious"}


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PrismError, match="exists and is a file"):
        open_output(str(tmp_path / "f"), "sft", CONFIG, [])


# ----------------------------------------------------------------------------------- main process only

def test_non_main_process_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    d = tmp_path / "run"
    run = open_output(str(d), "sft", CONFIG, [])
    run.log_metrics({"step": 1})
    run.truncate_metrics(0)
    assert run.finalize(summary={"x": 1}) == d
    assert not d.exists()
    # nor does it delete: --overwrite on a complete directory is the main process's job
    monkeypatch.setenv("RANK", "0")
    done = make_ckpt(tmp_path / "done")
    before = snapshot(done)
    monkeypatch.setenv("RANK", "1")
    open_output(str(done), "sft", CONFIG, [], overwrite=True)
    assert snapshot(done) == before


# ------------------------------------------------------------------------------------------- secrets

def test_scrub_redacts_secret_keys_only():
    cfg = {"api_key": "sk-1", "OPENAI_API_KEY": "sk-2", "hf_token": "hf_3", "token": "t", "password": "p",
           "client_secret": "s", "secret_key": "s2", "nested": {"auth_token": "a", "lr": 0.1},
           "teachers": [{"gemini-api-key": "g", "model": "m"}],
           "max_new_tokens": 64, "micro_batch_tokens": 1024, "est_output_tokens": 1500, "max_pass": 0.0,
           "api_key_unset": None, "hf_token_empty": "", "empty_token": ""}
    s = checkpoint.scrub(cfg)
    for key in ("api_key", "OPENAI_API_KEY", "hf_token", "token", "password", "client_secret", "secret_key"):
        assert s[key] == "<redacted>", key
    assert s["nested"] == {"auth_token": "<redacted>", "lr": 0.1}
    assert s["teachers"] == [{"gemini-api-key": "<redacted>", "model": "m"}]
    for key in ("max_new_tokens", "micro_batch_tokens", "est_output_tokens", "max_pass", "empty_token"):
        assert s[key] == cfg[key], key


def test_secrets_never_reach_the_directory(tmp_path):
    secret = "sk-THIS-MUST-NOT-LEAK"
    cfg = dict(CONFIG, api_key=secret)
    run = open_output(str(tmp_path / "run"), "curate", cfg, [])
    assert secret not in (run.path / RUN_MARKER).read_text()
    run.finalize(summary={"hf_token": secret, "n": 3})
    text = (run.path / MANIFEST).read_text()
    assert secret not in text
    m = json.loads(text)
    assert m["config"]["api_key"] == "<redacted>" and m["config"]["max_new_tokens"] == 64
    assert m["summary"] == {"hf_token": "<redacted>", "n": 3}


def test_lineage_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """cd chain && rl --ckpt sft --out rl; cd ..: the parent is still found intact (issue 33), and a
    chain moved as a whole keeps its lineage (parents are also stored relative to the child)."""
    chain_dir = tmp_path / "chain"
    chain_dir.mkdir()
    monkeypatch.chdir(chain_dir)
    make_ckpt(Path("sft"))
    make_ckpt(Path("rl"), stage="rl", parents=[("policy", resolve("sft"))])
    monkeypatch.chdir(tmp_path)
    links = checkpoint.lineage(resolve("chain/rl"))
    assert [(link["stage"], link["ok"]) for link in links] == [("rl", True), ("sft", True)]
    assert resolve(links[1]["ref"]).path.resolve() == (chain_dir / "sft").resolve()
    moved = tmp_path / "elsewhere"
    chain_dir.rename(moved)
    links = checkpoint.lineage(resolve(str(moved / "rl")))
    assert [(link["stage"], link["ok"]) for link in links] == [("rl", True), ("sft", True)]
