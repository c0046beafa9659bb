"""prism curate --batch with the real google-genai client against the fake Gemini Batch/Files API on 127.0.0.1."""

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
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import read_shards
from stages.common.world.synth import load as synth_load
from stages.curate import pricing
from stages.curate.batch import JOB_LOG, JobLog, Shard, plan_shards, rest_request
from stages.curate.config import CurateConfig
from stages.curate.run import run
from tests.fakes import oracle_responder
from tests.fakes.gemini_server import FakeGemini, use_only_key

KEY = "test-key-SECRET-b4tch-91c2"
SPEC = "synth:train:12"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def key(monkeypatch):
    return use_only_key(monkeypatch, KEY)


def config(fake: FakeGemini, out: Path, **over) -> CurateConfig:
    values = dict(source=[SPEC], teacher="gemini-3-flash", out=str(out), gemini_base_url=fake.url, batch=True,
                  batch_poll=0.02, concurrency=4, backoff=0.01, backoff_max=0.05, timeout=5.0)
    values.update(over)
    return resolve_config(CurateConfig, flags=values)


def scan_for_key(root: Path, key: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]


def job_log(out: Path) -> list[dict]:
    recs = {}
    for line in (out / "state" / JOB_LOG).read_text().splitlines():
        rec = json.loads(line)
        recs[rec["key"]] = rec["value"]
    return [v for k, v in recs.items() if k != "_run"]


def test_file_mode_matches_interactive_at_half_the_cost(tmp_path, key):
    samples = synth_load(SPEC)
    wrong = {samples[0].id}  # wrong on every attempt: three rounds of batches for it
    with FakeGemini(responder=oracle_responder(samples, wrong_ids=wrong), batch_delay=0.05) as fake:
        out = run(config(fake, tmp_path / "batch", batch_input="file", batch_shard_requests=5,
                         thinking_level="low"))
        stats = fake.stats()
        assert fake.api_keys == {KEY} and fake.repeated() == {}
        # 12 requests in shards of 5 (3 jobs), then one job for each retry of the wrong one
        assert stats["jobs"] == 5 and stats["batch_calls"]["upload"] == 5 and stats["successes"] == 14
        interactive = run(config(fake, tmp_path / "interactive", batch=False))
    kept, kept_i = read_shards(out / "data"), read_shards(interactive / "data")
    assert [s.id for s in kept] == [s.id for s in samples if s.id not in wrong]
    assert [(s.id, s.teacher.caption, s.teacher.think, s.teacher.answer) for s in kept] == \
           [(s.id, s.teacher.caption, s.teacher.think, s.teacher.answer) for s in kept_i]
    assert kept[0].images == samples[1].images
    m, mi = load_manifest(out)["summary"], load_manifest(interactive)["summary"]
    for field in ("kept", "rejected", "attempt_verdicts", "usage", "teacher_accuracy"):
        assert m[field] == mi[field], field
    assert m["cost_usd_estimate"] == pytest.approx(mi["cost_usd_estimate"] * pricing.BATCH_DISCOUNT)
    assert m["batch"]["jobs_created"] == 5 and m["batch"]["final_states"] == {"SUCCEEDED": 5}
    assert m["batch"]["usage_at_batch_price"]["total"] == m["usage"]["total"]
    assert m["calls"]["answered_this_run"] == 14
    assert not (out / "state").exists()  # job log, shards and result files go with the finished run's state/
    assert scan_for_key(out, KEY) == []


def test_batch_line_is_the_interactive_request(tmp_path, key):
    """The JSONL line's request is byte-for-byte the body generateContent sends for the same problem."""
    from stages.curate.collect import Collector, Tally
    from stages.curate.teachers import make_teacher, parse_teacher

    samples = synth_load("synth:train:2")
    with FakeGemini() as fake:
        fake.keep_bodies = True
        cfg = config(fake, tmp_path / "x", thinking_level="high", temperature=0.7)
        teacher = make_teacher(parse_teacher(cfg.teacher), cfg)
        collector = Collector(teacher, None, attempts=1, gate="verify", seed=3, tally=Tally(teacher.model, {}))
        req, _ = collector.request(samples[1], attempt=2)
        teacher.call(req)
        line = json.loads(json.dumps(rest_request(teacher, req)))
        teacher.close()
        assert line == fake.bodies[0]
        assert "HIGH" in json.dumps(line["generationConfig"]) and line["generationConfig"]["temperature"] == 0.7


def test_inline_shards_and_a_partially_failed_batch(tmp_path, key):
    samples = synth_load(SPEC)
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        # the first job's lines 2 and 4 come back as errors (a 500 and a 429): only those go out again;
        # line 6's INVALID_ARGUMENT is that request's own fault: a bad_request reply, not re-batched
        fake.script([None, "500", None, "429", None, "400"])
        out = run(config(fake, tmp_path / "out", batch_shard_requests=6))  # auto: small shards go inline
        stats = fake.stats()
    assert stats["batch_calls"].get("upload", 0) == 0 and stats["jobs"] == 3  # 2 shards + 1 retry batch
    assert stats["successes"] == 11 and stats["repeated"] == 0
    m = load_manifest(out)["summary"]
    assert m["kept"] == 11 and m["rejected"] == {"bad_request": 1} and m["batch"]["line_errors"] == 2
    assert [s.id for s in read_shards(out / "data")] == [s.id for s in samples if s.id != samples[5].id]


def test_expired_batch_goes_again_then_fallback_interactive(tmp_path, key):
    samples = synth_load(SPEC)
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        fake.batch_script(["expired"])
        out = run(config(fake, tmp_path / "again"))
        assert fake.stats()["jobs"] == 2 and fake.stats()["successes"] == 12
        assert load_manifest(out)["summary"]["batch"]["final_states"] == {"EXPIRED": 1, "SUCCEEDED": 1}

        fake.batch_script(["expired"])
        before = fake.stats()["statuses"]["200"]
        out = run(config(fake, tmp_path / "fallback", batch_fallback=True))
        assert fake.stats()["jobs"] == 3  # the expired one; its keys went interactive
        assert fake.stats()["statuses"]["200"] - before == 12
    m = load_manifest(out)["summary"]
    assert m["kept"] == 12 and m["batch"]["answered_interactively"] == 12
    assert "total" not in m["batch"]["usage_at_batch_price"]  # nothing billed at the batch price
    assert m["cost_usd_estimate"] == pytest.approx(pricing.cost(
        {"prompt_tokens": 300 * 12, "output_tokens": 120 * 12, "thought_tokens": 80 * 12}, "gemini-3-flash"))


def test_failed_batches_stop_with_one_error_then_resume(tmp_path, key):
    samples = synth_load("synth:train:4")
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        fake.batch_script(["failed", "failed"])
        with pytest.raises(PrismError) as err:
            run(config(fake, tmp_path / "out", source=["synth:train:4"], batch_retries=1))
        assert "unanswered" in err.value.message and "--resume" in err.value.hint
        out = run(config(fake, tmp_path / "out", source=["synth:train:4"], batch_retries=1, resume=True))
        assert fake.stats()["jobs"] == 3
    assert load_manifest(out)["summary"]["kept"] == 4


def test_429_on_create_waits_and_creates_once(tmp_path, key):
    samples = synth_load(SPEC)
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        fake.batch_script(["429:0.01", "429:0.02", "ok"])
        out = run(config(fake, tmp_path / "out"))
        stats = fake.stats()
    assert stats["batch_calls"]["create_429"] == 2 and stats["jobs"] == 1 and stats["successes"] == 12
    m = load_manifest(out)["summary"]
    assert m["kept"] == 12 and m["batch"]["create_429"] == 2 and m["batch"]["jobs_created"] == 1


def test_429_forever_with_nothing_queued_is_one_error(tmp_path, key):
    with FakeGemini() as fake:
        fake.batch_script(["429:0.01"] * 10)
        with pytest.raises(PrismError) as err:
            run(config(fake, tmp_path / "out", max_retries=2))
    assert "refused" in err.value.message and "--batch-shard-requests" in err.value.hint


def test_queued_token_cap_keeps_one_job_in_flight(tmp_path, key):
    samples = synth_load(SPEC)
    with FakeGemini(responder=oracle_responder(samples), batch_delay=0.05) as fake:
        # about 300 estimated prompt tokens a request: a cap of 1,000 allows one 3-request job at a time
        out = run(config(fake, tmp_path / "out", batch_queue_tokens=1000))
        stats = fake.stats()
    assert stats["jobs"] >= 4 and stats["max_active_jobs"] == 1 and stats["successes"] == 12
    assert load_manifest(out)["summary"]["kept"] == 12


def test_resume_finds_a_job_created_just_before_a_kill(tmp_path, key):
    """A 'submitting' record whose create reached the server: found by display name, not created again."""
    from google import genai
    from google.genai import types

    from stages.curate.batch import batch_key, inline_request
    from stages.curate.collect import Collector, Tally
    from stages.curate.teachers import make_teacher, parse_teacher

    samples = synth_load("synth:train:3")
    out = tmp_path / "out"
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        cfg = config(fake, out, source=["synth:train:3"])
        # what a run killed right after its create left behind: a run marker, a job log, a job on the server
        with pytest.raises(PrismError):
            fake.batch_script(["failed"])
            run(config(fake, out, source=["synth:train:3"], batch_retries=0))
        state = out / "state"
        teacher = make_teacher(parse_teacher(cfg.teacher), cfg)
        collector = Collector(teacher, None, attempts=3, gate="verify", seed=cfg.seed, tally=Tally("m", {}))
        log = JobLog(state / JOB_LOG)
        display = log.next_display(0)
        keys = [batch_key(s.id, 0) for s in samples]
        log.put({"display": display, "attempt": 0, "keys": keys, "input": "inline", "tokens": 900,
                 "state": "SUBMITTING", "name": ""})
        log.close()
        client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=fake.url, api_version="v1beta"))
        client.batches.create(model="gemini-3-flash", config={"display_name": display},
                              src=[inline_request(teacher, collector.request(s, 0)[0], k)
                                   for s, k in zip(samples, keys)])
        teacher.close()
        jobs_before = fake.stats()["jobs"]
        done = run(config(fake, out, source=["synth:train:3"], batch_retries=0, resume=True))
        assert fake.stats()["jobs"] == jobs_before and fake.repeated() == {}
    m = load_manifest(done)["summary"]
    assert m["kept"] == 3 and m["batch"]["jobs_reattached"] == 1 and m["batch"]["jobs_created"] == 0


def _cli(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prism_cli", "curate", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_while_waiting_then_resume_creates_no_job_twice(tmp_path):
    spec = "synth:train:30"
    samples = synth_load(spec)
    out_dir = tmp_path / "out"
    env = {**os.environ, "GEMINI_API_KEY": KEY, "PRISM_NO_PROGRESS": "1"}
    env.pop("GOOGLE_API_KEY", None)
    with FakeGemini(responder=oracle_responder(samples), batch_delay=5.0) as fake:  # outlasts the kill
        env["PRISM_GEMINI_BASE_URL"] = fake.url
        args = ["--source", spec, "--out", str(out_dir), "--batch", "--batch-poll", "0.05",
                "--batch-shard-requests", "8", "--batch-input", "file", "--set", "batch_report=0"]
        proc = _cli(args, env)
        deadline = time.monotonic() + 60
        while fake.stats()["jobs"] < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.2)  # it is polling now: every job recorded, none finished
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=10)
        assert fake.stats()["jobs"] == 4 and fake.total_successes() == 0, stderr
        assert "batch: jobs:" in stderr  # the plain progress line off a terminal
        recorded = job_log(out_dir)
        assert sorted(r["name"] for r in recorded) == sorted(fake.jobs_created())
        assert scan_for_key(out_dir, KEY) == []  # state/ mid-run: job log, cache, shards
        proc = _cli(args + ["--resume"], env)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        stats = fake.stats()
    assert stats["jobs"] == 4 and stats["batch_calls"]["create"] == 4  # no job created twice
    assert stats["successes"] == 30 and stats["repeated"] == 0          # no result lost or paid twice
    kept = read_shards(out_dir / "data")
    assert [s.id for s in kept] == [s.id for s in samples]             # each applied once, in source order
    m = load_manifest(out_dir)["summary"]
    assert m["batch"]["jobs_reattached"] == 4 and m["batch"]["jobs_created"] == 0
    assert m["calls"]["answered_this_run"] == 30
    assert KEY not in stdout + stderr and scan_for_key(out_dir, KEY) == []
    assert not any(KEY.encode() in data for data in fake.files.values())  # nor in what was uploaded


def test_plan_shards_respects_every_limit(tmp_path):
    sizes = {f"k{i}": (b"x" * (10 + i), 100 + i) for i in range(20)}
    shards = list(plan_shards(list(sizes), sizes.__getitem__, max_requests=6, max_bytes=80, max_tokens=350,
                              work=tmp_path))
    assert [k for s in shards for k in s.keys] == list(sizes)  # every key once, in order
    for s in shards:
        assert isinstance(s, Shard) and len(s.keys) <= 6 and s.size <= 80 and s.tokens <= 350
        assert s.lines.read_bytes() == b"".join(sizes[k][0] for k in s.keys)
    big = list(plan_shards(["a"], lambda k: (b"y" * 500, 9999), max_requests=6, max_bytes=80, max_tokens=350,
                           work=tmp_path))
    assert len(big) == 1 and big[0].keys == ["a"]  # one oversized request still ships, alone


def test_batch_pricing_is_half_and_mixes_with_interactive():
    one = {"prompt_tokens": 1000, "output_tokens": 200, "thought_tokens": 100, "total_tokens": 1300}
    full = pricing.cost(one, "gemini-3-flash")
    assert pricing.cost({**one, "batch": True}, "gemini-3-flash") == pytest.approx(full / 2)
    total: dict = {}
    pricing.add_usage(total, {**one, "batch": True})
    pricing.add_usage(total, one)
    assert total["prompt_tokens"] == 2000 and total["batch_prompt_tokens"] == 1000
    assert pricing.cost(total, "gemini-3-flash") == pytest.approx(full * 1.5)
    again: dict = {}
    pricing.add_usage(again, total)  # a sum of sums keeps its batch share
    assert pricing.cost(again, "gemini-3-flash") == pytest.approx(full * 1.5)


def test_batch_needs_a_gemini_teacher(tmp_path):
    # the teacher is parsed by curate.run (the teacher table imports the teachers' libraries), before any work
    with pytest.raises(UsageError, match=r"--batch needs a teacher with a batch API \(gemini"):
        run(resolve_config(CurateConfig, flags={"teacher": "oracle", "batch": True, "out": str(tmp_path / "o")}))
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="--batch-input"):
        resolve_config(CurateConfig, flags={"batch": True, "batch_input": "smoke"})


def test_dry_run_plans_at_the_batch_price(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    flags = dict(source=["synth:train:40"], out=str(tmp_path / "o"), dry_run=True)
    run(resolve_config(CurateConfig, flags=flags))
    full = capsys.readouterr().out
    run(resolve_config(CurateConfig, flags={**flags, "batch": True}))
    half = capsys.readouterr().out
    def cost(text):
        return float(text.split("~$")[1].split()[0])

    assert "Batch API at 50%" in half and "up to 5000 requests a job" in half
    assert cost(full) > 0.1 and cost(half) == pytest.approx(cost(full) / 2, abs=0.006)
    assert not (tmp_path / "o").exists()


def test_identical_problems_under_two_ids_are_both_answered(tmp_path, key):
    """Same question and image under two ids: one request sent, its answer replayed for the twin."""
    import dataclasses

    from stages.common.contract.samples import write_shards

    samples = synth_load("synth:train:4")
    twin = dataclasses.replace(samples[1], id="twin-of-1")
    src = write_shards(samples + [twin], tmp_path / "src")[0]
    with FakeGemini(responder=oracle_responder(samples)) as fake:
        out = run(config(fake, tmp_path / "out", source=[str(src)]))
        assert fake.stats()["jobs"] == 1 and fake.stats()["successes"] == 4
    m = load_manifest(out)["summary"]
    assert m["kept"] == 5 and m["calls"]["answered_this_run"] == 4 and m["calls"]["replayed_from_cache"] == 1
    assert [s.id for s in read_shards(out / "data")] == [s.id for s in samples] + ["twin-of-1"]


def test_killed_while_applying_results_resumes_without_applying_twice(tmp_path, key, monkeypatch):
    """Killed after 5 of a job's 12 answers reached the cache: --resume re-reads the job, takes the other 7."""
    from stages.curate.collect import Collector

    samples = synth_load(SPEC)
    record = Collector.record
    seen = []

    def dying_record(self, cache_key, reply):
        if len(seen) == 5:
            raise KeyboardInterrupt  # what a kill mid-collection leaves: some answers cached, job not "applied"
        seen.append(cache_key)
        record(self, cache_key, reply)

    with FakeGemini(responder=oracle_responder(samples)) as fake:
        monkeypatch.setattr(Collector, "record", dying_record)
        with pytest.raises(KeyboardInterrupt):
            run(config(fake, tmp_path / "out"))
        monkeypatch.setattr(Collector, "record", record)
        out = run(config(fake, tmp_path / "out", resume=True))
        stats = fake.stats()
    assert stats["jobs"] == 1 and stats["batch_calls"]["create"] == 1 and stats["successes"] == 12
    m = load_manifest(out)["summary"]
    assert m["kept"] == 12 and m["calls"] == {"answered_this_run": 7, "replayed_from_cache": 5, "retries": {}}
    assert m["batch"]["jobs_reattached"] == 1 and m["batch"]["unmatched_keys"] == 5
    assert [s.id for s in read_shards(out / "data")] == [s.id for s in samples]
