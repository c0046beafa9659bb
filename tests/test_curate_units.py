"""Pure pieces of prism curate: retry policy, rate limiter, cache, gate, pricing, teacher specs,
plus the OpenAI-compatible teacher, the oracle recipes and --select unsolved with the tiny student."""

from __future__ import annotations

import json
import random

import pytest

from stages.common.contract.checkpoint import load_manifest
from stages.common.contract.config import resolve as resolve_config
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample, read_shards
from stages.common.protocol import format_response
from stages.common.world.synth import load as synth_load
from stages.curate import pricing
from stages.curate.cache import JsonlCache, cache_key
from stages.curate.config import CurateConfig
from stages.curate.gate import judge
from stages.curate.resilience import (
    Fatal,
    RateLimiter,
    RetriesExhausted,
    RetryPolicy,
    Transient,
    call_with_retry,
    parse_retry_after,
    transport_failure,
)
from stages.curate.run import run
from stages.curate.teachers import Reply, parse_teacher


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("1.5") == 1.5 and parse_retry_after("7s") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0 + 1e-9  # a past date: now


def test_backoff_is_jittered_capped_and_honours_retry_after():
    p = RetryPolicy(base=1.0, cap=8.0, rng=random.Random(0))
    delays = [p.delay(r, None) for r in range(10)]
    assert all(0 <= d <= min(8.0, 2 ** r) for r, d in enumerate(delays)) and len(set(delays)) == 10
    assert p.delay(0, 5.0) == 5.0 and p.delay(0, 1e6) == p.max_retry_after


def test_call_with_retry_retries_transients_only():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Transient("http_429", retry_after=2.0)
        return "ok"

    assert call_with_retry(flaky, RetryPolicy(max_retries=5, rng=random.Random(0)), sleep=waits.append) == "ok"
    assert len(waits) == 2 and all(w >= 2.0 for w in waits)
    with pytest.raises(RetriesExhausted):
        call_with_retry(lambda: (_ for _ in ()).throw(Transient("timeout")), RetryPolicy(max_retries=2),
                        sleep=lambda s: None)
    calls.clear()

    def fatal():
        calls.append(1)
        raise Fatal("http_401")

    with pytest.raises(Fatal):
        call_with_retry(fatal, RetryPolicy(max_retries=5), sleep=lambda s: None)
    assert len(calls) == 1


def test_transport_failures_are_classified():
    import httpx

    assert transport_failure(httpx.ReadTimeout("t")).reason == "timeout"
    assert transport_failure(httpx.RemoteProtocolError("gone")).reason == "reset"
    assert transport_failure(ConnectionResetError()).reason == "reset"
    assert transport_failure(httpx.ConnectError("refused")).reason == "connection"
    assert transport_failure(ValueError("bug")) is None


def test_rate_limiter_token_bucket():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    lim = RateLimiter(rpm=120, clock=lambda: now[0], sleep=sleep)  # 2/s, burst 2
    for _ in range(6):
        lim.acquire()
    assert now[0] == pytest.approx(2.0)  # 2 free, then 4 more at 0.5 s each
    assert RateLimiter(0).enabled is False


def test_cache_survives_torn_lines_and_reopens(tmp_path):
    path = tmp_path / "c.jsonl"
    with JsonlCache(path) as c:
        c.put("a", {"x": 1})
        c.put("b", {"x": 2})
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "val')
    c = JsonlCache(path)
    assert c.torn == 1 and c.get("a") == {"x": 1} and "c" not in c
    c.put("d", 4)
    c.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "d"]
    # complete JSON that only lost its newline is kept
    with open(path, "ab") as f:
        f.write(json.dumps({"key": "e", "value": 5}).encode())
    c = JsonlCache(path)
    assert c.get("e") == 5 and c.torn == 0
    c.put("f", 6)
    c.close()
    assert len(path.read_text().splitlines()) == 5
    path.write_text('{"key": "a", "value": 1}\n{broken\n{"key": "b", "value": 2}\n')
    with pytest.raises(PrismError, match="corrupt at line 2"):
        JsonlCache(path)


def test_cache_key_covers_attempt_and_sampling():
    base = dict(teacher="gemini", model="m", question="q", images=["h"], sampling={"temperature": 1.0}, attempt=0)
    assert cache_key(**base) == cache_key(**dict(base))
    assert cache_key(**base) != cache_key(**{**base, "attempt": 1})
    assert cache_key(**base) != cache_key(**{**base, "sampling": {"temperature": 0.5}})


def test_gate_reasons():
    s = Sample(id="1", images=[], question="2+2?", answer="4")
    good = format_response("- nothing", "2+2=4", "4")
    assert judge(Reply(good), s).ok
    assert judge(Reply(format_response("c", "t", "5")), s).reason == "wrong_answer"
    assert judge(Reply("the answer is 4"), s).reason == "bad_format"
    assert judge(Reply("the answer is 4"), s, gate="none").ok
    assert judge(Reply(format_response("c", "t", "5")), s, gate="format").ok
    assert judge(Reply(None, "blocked"), s).reason == "blocked"
    assert judge(Reply(good[:20], "max_tokens"), s).reason == "max_tokens"
    assert judge(Reply("   "), s).reason == "empty"
    assert judge(Reply(good), Sample(id="2", images=[], question="q")).reason == "no_ground_truth"


def test_pricing():
    usage = {"prompt_tokens": 1_000_000, "output_tokens": 500_000, "thought_tokens": 500_000}
    assert pricing.cost(usage, "gemini-3-flash") == pytest.approx(0.5 + 3.0)
    assert pricing.price_for("gemini-3-flash-preview") == pricing.DEFAULT_PRICES["gemini-3-flash"]
    assert pricing.cost(usage, "gemini-3-flash", {"gemini-3-flash": {"input": 1, "output": 1}}) == pytest.approx(2.0)
    assert pricing.cost(usage, "some-other-model") == 0.0
    assert pricing.image_tokens(64, 64) == 258 and pricing.image_tokens(1000, 700) == 516


def test_teacher_specs():
    assert parse_teacher("gemini-3-flash").kind == "gemini"
    assert parse_teacher("gemini:gemini-2.5-pro").model == "gemini-2.5-pro"
    s = parse_teacher("openai:http://localhost:8000/v1#Qwen/Qwen3-VL-235B")
    assert (s.kind, s.url, s.model) == ("openai", "http://localhost:8000/v1", "Qwen/Qwen3-VL-235B")
    assert parse_teacher("hf:out/sft").kind == "hf" and parse_teacher("oracle-noisy").kind == "oracle"
    for bad in ("openai:localhost#m", "openai:http://x", "hf:", "what is this"):
        with pytest.raises(UsageError):
            parse_teacher(bad)


def test_config_validation():
    with pytest.raises(UsageError, match="needs --student"):
        resolve_config(CurateConfig, flags={"select": "unsolved", "out": "x"})
    with pytest.raises(UsageError, match="gate"):
        resolve_config(CurateConfig, flags={"gate": "maybe", "out": "x"})


def test_oracle_recipes(tmp_path):
    out = run(resolve_config(CurateConfig, flags={"source": ["synth:train:30"], "teacher": "oracle-noisy",
                                                  "gate": "none", "out": str(tmp_path / "noisy")}))
    kept = read_shards(out / "data")
    assert len(kept) == 30 and any(s.teacher.answer != s.answer for s in kept)
    m = load_manifest(out)["summary"]
    assert m["kept"] == 30 and m["teacher_accuracy"] < 1
    out = run(resolve_config(CurateConfig, flags={"source": ["synth:train:30"], "teacher": "oracle-noisy",
                                                  "out": str(tmp_path / "verified")}))
    assert all(s.teacher.answer == s.answer for s in read_shards(out / "data"))


def test_openai_compatible_teacher(tmp_path, monkeypatch):
    from tests.fakes.openai_server import FakeOpenAI

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-SECRET")
    samples = synth_load("synth:train:5")
    answers = {s.question: format_response("- shapes", "solve", s.answer) for s in samples}

    def respond(body):
        return answers[body["messages"][1]["content"][-1]["text"]]

    with FakeOpenAI(respond) as fake:
        fake.script(["429:0", "500", "reset", "length", "filter"])
        out = run(resolve_config(CurateConfig, flags={
            "source": ["synth:train:5"], "teacher": f"openai:{fake.url}#big-vlm", "out": str(tmp_path / "o"),
            "concurrency": 1, "backoff": 0.01}))
        assert fake.auth == {"Bearer sk-openai-SECRET"}
        image = fake.bodies[0]["messages"][1]["content"][0]["image_url"]["url"]
        assert image.startswith("data:image/png;base64,")
    m = load_manifest(out)["summary"]
    assert m["kept"] == 4 and m["rejected"] == {"blocked": 1}
    assert m["attempt_verdicts"]["max_tokens"] == 1
    assert m["calls"]["retries"] == {"http_429": 1, "http_500": 1, "reset": 1}
    assert m["usage"]["thought"] == 30 * 6
    assert not any(b"sk-openai-SECRET" in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_select_unsolved_with_tiny_student(tmp_path, tiny_path):
    flags = {"source": ["synth:train:4"], "teacher": "oracle", "select": "unsolved", "student": "tiny", "k": 2,
             "max_pass": 0.5, "out": str(tmp_path / "o")}
    flags_cfg = resolve_config(CurateConfig, flags=flags, sets=["student_max_new_tokens=8", "rollout_batch=4"])
    out = run(flags_cfg)
    m = load_manifest(out)["summary"]
    hist = m["student_pass"]["histogram"]
    assert sum(hist.values()) == 4 and set(hist) == {"0", "1", "2"}
    assert m["selected"] == hist["0"] + hist["1"]
    kept = read_shards(out / "data")
    assert all(s.meta["curate"]["student_pass"]["k"] == 2 for s in kept)
    assert load_manifest(out)["parents"][0]["role"] == "student"
