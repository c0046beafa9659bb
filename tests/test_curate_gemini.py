"""prism curate with the real google-genai client against a fake Gemini REST server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common.contract.checkpoint import load_manifest
from stages.common.contract.config import resolve as resolve_config
from stages.common.contract.errors import PrismError
from stages.common.contract.samples import read_shards
from stages.common.world.synth import load as synth_load
from stages.curate.config import CurateConfig
from stages.curate.run import run
from tests.fakes import oracle_responder
from tests.fakes.gemini_server import FakeGemini, request_images, use_only_key

KEY = "test-key-SECRET-7f3a9c"
SPEC = "synth:train:12"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def key(monkeypatch):
    return use_only_key(monkeypatch, KEY)


def config(fake: FakeGemini, out: Path, **over) -> CurateConfig:
    values = dict(source=[SPEC], teacher="gemini-3-flash", out=str(out), gemini_base_url=fake.url,
                  concurrency=4, backoff=0.01, backoff_max=0.05, timeout=5.0)
    values.update(over)
    return resolve_config(CurateConfig, flags=values)


def scan_for_key(root: Path, key: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]


def test_success_with_images_tokens_and_no_secret(tmp_path, key):
    samples = synth_load(SPEC)
    wrong = {samples[0].id}  # the teacher is wrong on every attempt for this one
    with FakeGemini(responder=oracle_responder(samples, wrong_ids=wrong)) as fake:
        fake.keep_bodies = True
        out = run(config(fake, tmp_path / "out", thinking_level="low"))
        assert fake.api_keys == {KEY}
        body = fake.bodies[0]
    # the request carried the image bytes, the question, the protocol system prompt and the thinking level
    images = request_images(body)
    assert images and images[0].startswith(b"\x89PNG")
    assert "<caption>" in json.dumps(body.get("systemInstruction", body.get("system_instruction")))
    assert "LOW" in json.dumps(body)
    kept = read_shards(out / "data")
    assert [s.id for s in kept] == [s.id for s in samples if s.id not in wrong]  # source order
    by_id = {s.id: s for s in samples}
    for s in kept:
        assert s.images == by_id[s.id].images
        assert s.teacher.answer == s.answer and s.teacher.caption and s.teacher.think
        assert s.teacher.model == "gemini-3-flash" and s.teacher.usage["prompt_tokens"] == 300
    m = load_manifest(out)["summary"]
    assert m["kept"] == len(samples) - 1 and m["rejected"] == {"wrong_answer": 1}
    assert m["attempt_verdicts"]["wrong_answer"] == 3  # attempts=3 for the wrong one
    assert m["usage"] == {"prompt": 300 * (len(samples) + 2), "output": 120 * (len(samples) + 2),
                          "thought": 80 * (len(samples) + 2), "total": 500 * (len(samples) + 2)}
    assert m["cost_usd_estimate"] > 0 and m["teacher_accuracy"] == pytest.approx(11 / 14)
    assert scan_for_key(out, KEY) == []
    assert fake.repeated() == {}


def test_transient_faults_are_retried_and_nothing_lost(tmp_path, key):
    samples = synth_load(SPEC)
    with FakeGemini(responder=oracle_responder(samples), hang_s=1.5) as fake:
        fake.script(["429:0.05", "500", "503", "reset", "timeout", "429:0.01", "reset"])
        out = run(config(fake, tmp_path / "out", timeout=0.5))
        stats = fake.stats()
    m = load_manifest(out)["summary"]
    assert m["kept"] == len(samples) and m["rejected"] == {}
    assert m["calls"]["retries"] == {"http_429": 2, "http_500": 1, "http_503": 1, "reset": 2, "timeout": 1}
    assert stats["repeated"] == 0 and stats["successes"] == len(samples)
    assert stats["statuses"]["429"] == 2 and stats["statuses"]["reset"] == 2


def test_blocked_max_tokens_and_malformed_are_counted(tmp_path, key):
    samples = synth_load("synth:train:4")
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        # concurrency 1: faults land on problems in order. 0: blocked (not retried); 1: MAX_TOKENS then ok;
        # 2: malformed x3 (rejected); 3: ok
        fake.script(["blocked", "max_tokens", None, "malformed", "malformed", "malformed"])
        out = run(config(fake, tmp_path / "out", source=["synth:train:4"], concurrency=1))
    m = load_manifest(out)["summary"]
    assert m["kept"] == 2
    assert m["rejected"] == {"bad_format": 1, "blocked": 1}
    assert m["attempt_verdicts"] == {"bad_format": 3, "blocked": 1, "kept": 2, "max_tokens": 1}
    assert m["finish"] == {"blocked": 1, "max_tokens": 1, "stop": 5}
    assert [s.id for s in read_shards(out / "data")] == [samples[1].id, samples[3].id]


def test_outage_stops_with_one_error_then_resume_finishes(tmp_path, key):
    samples = synth_load(SPEC)
    out_dir = tmp_path / "out"
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        fake.script([None] * 5)                   # five answers, then the service goes down
        fake.fault_rates = {"503": 1.0}
        with pytest.raises(PrismError) as err:
            run(config(fake, out_dir, max_retries=2, concurrency=1))
        assert "unavailable" in err.value.message and "503" in err.value.message
        assert "--resume" in err.value.hint
        assert not (out_dir / "prism.json").exists()
        first = fake.total_successes()
        assert first == 5
        fake.fault_rates = {}
        out = run(config(fake, out_dir, max_retries=2, concurrency=1, resume=True))
        assert fake.repeated() == {}
        assert fake.total_successes() == len(samples)
    m = load_manifest(out)["summary"]
    assert m["kept"] == len(samples) and m["calls"]["replayed_from_cache"] == 5


def test_missing_key_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with FakeGemini() as fake:
        with pytest.raises(PrismError, match="no Gemini API key"):
            run(config(fake, tmp_path / "out"))
        assert fake.requests == 0
    assert not (tmp_path / "out").exists()


def test_bad_key_is_fatal_not_retried(tmp_path, key):
    with FakeGemini() as fake:
        fake.fault_rates = {"401": 1.0}
        with pytest.raises(PrismError, match="API key valid"):
            run(config(fake, tmp_path / "out", concurrency=1))
        assert fake.stats()["statuses"] == {"401": 1}


def test_dry_run_calls_nothing_and_needs_no_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with FakeGemini() as fake:
        assert run(config(fake, tmp_path / "out", dry_run=True)) is None
        assert fake.requests == 0
    text = capsys.readouterr().out
    assert "estimated cost" in text and "at most 36" in text
    assert not (tmp_path / "out").exists()


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prism_cli", "curate", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_sigkill_then_resume_repeats_no_successful_call(tmp_path):
    spec = "synth:train:40"
    samples = synth_load(spec)
    out_dir = tmp_path / "out"
    cache = out_dir / "state" / "teacher_cache.jsonl"
    env = {**os.environ, "GEMINI_API_KEY": KEY, "PRISM_NO_PROGRESS": "1"}
    env.pop("GOOGLE_API_KEY", None)
    with FakeGemini(responder=oracle_responder(samples, wrong_ids={samples[3].id}), latency=0.02) as fake:
        env["PRISM_GEMINI_BASE_URL"] = fake.url
        args = ["--source", spec, "--out", str(out_dir), "--concurrency", "4", "--backoff", "0.01"]
        proc = _cli(args, env)
        deadline = time.monotonic() + 60
        while fake.total_successes() < 15 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        fake.hold()  # later requests hang: nothing answered can be lost in flight
        time.sleep(0.1)
        # every answered request must be on disk before the kill (it is written before it is used)
        while _lines(cache) < fake.total_successes() and time.monotonic() < deadline:
            time.sleep(0.01)
        answered = fake.total_successes()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        fake.release()
        assert 15 <= answered < 40 and _lines(cache) == answered
        with open(cache, "ab") as f:
            f.write(b'{"key": "torn')  # what a kill mid-write leaves behind
        proc = _cli(args + ["--resume"], env)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert fake.repeated() == {}
        assert fake.total_successes() == 40 + 2  # one wrong answer asked three times
    kept = read_shards(out_dir / "data")
    assert [s.id for s in kept] == [s.id for s in samples if s.id != samples[3].id]
    assert len({s.id for s in kept}) == len(kept)
    m = load_manifest(out_dir)["summary"]
    assert m["calls"]["replayed_from_cache"] == answered
    assert KEY not in stdout + stderr and scan_for_key(out_dir, KEY) == []


def test_outage_via_cli_exits_nonzero_with_one_line(tmp_path):
    env = {**os.environ, "GEMINI_API_KEY": KEY, "PRISM_NO_PROGRESS": "1"}
    with FakeGemini(fault_rates={"500": 1.0}) as fake:
        env["PRISM_GEMINI_BASE_URL"] = fake.url
        proc = _cli(["--source", "synth:train:3", "--out", str(tmp_path / "o"), "--max-retries", "1",
                     "--backoff", "0.01", "--concurrency", "1"], env)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unavailable" in errors[0] and "Traceback" not in stderr
    assert KEY not in stderr
