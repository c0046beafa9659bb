"""Teacher-call throughput of `prism curate` against the fake Gemini server (real google-genai client).

A second baseline, sdk_only: the same calls through bare google-genai on a thread pool (no cache, no
gate, no retries), which is what the machine allows; on a CPU-starved machine both fall short of the
ideal together, and ratio_vs_sdk_only isolates prism's own overhead.

Baseline: the ideal rate concurrency / latency (16 / 50 ms = 320 requests/s), i.e. a client with zero
overhead. Target: >= 0.9 of it. Second scenario: 30% of requests answered 429 (Retry-After given):
every sample must still be kept (zero lost). The fake runs in its own process so it does not share the
client's GIL; the client path is the production one (Collector + GeminiTeacher + fsync'd cache +
quality gate). Results: benchmarks/results/teacher_throughput.json.

    python benchmarks/teacher_throughput.py [--n 960] [--concurrency 16] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def start_fake(latency: float, rate_429: float, retry_after: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "tests.fakes.gemini_server", "--latency", str(latency),
           "--rate-429", str(rate_429), "--retry-after", retry_after]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def fake_stats(url: str) -> dict:
    import httpx

    return httpx.get(url + "/_stats").json()


def scenario(samples, concurrency: int, latency: float, rate_429: float, retry_after: str, backoff: float) -> dict:
    from stages.curate.cache import JsonlCache
    from stages.curate.collect import Collector, Tally
    from stages.curate.gemini import GeminiTeacher
    from stages.curate.resilience import RetryPolicy

    proc, url = start_fake(latency, rate_429, retry_after)
    try:
        teacher = GeminiTeacher("gemini-3-flash", api_key="bench-key", base_url=url, timeout_s=30,
                                concurrency=concurrency)
        with tempfile.TemporaryDirectory() as tmp:
            cache = JsonlCache(Path(tmp) / "cache.jsonl")
            tally = Tally(teacher.model, None)
            collector = Collector(teacher, cache, attempts=1, gate="format", seed=0, concurrency=concurrency,
                                  policy=RetryPolicy(max_retries=20, base=backoff, cap=1.0), tally=tally)
            collector.run(samples[:concurrency])  # warm the connection pool (not timed; distinct ids below)
            t0 = time.perf_counter()
            outcomes = collector.run(samples[concurrency:])
            wall = time.perf_counter() - t0
            cache.close()
        teacher.close()
        stats = fake_stats(url)
    finally:
        proc.terminate()
        proc.wait(10)
    n = len(samples) - concurrency
    kept = sum(o.kept for o in outcomes)
    ideal = concurrency / latency
    requests = tally.calls + sum(tally.retries.values())
    return {"problems": n, "kept": kept, "lost": n - kept, "wall_s": round(wall, 3),
            "samples_per_s": round(n / wall, 1), "requests_per_s": round(requests / wall, 1),
            "ideal_per_s": ideal, "ratio_vs_ideal": round((n / wall) / ideal, 3),
            "retries": tally.retries, "server": stats}


def sdk_only(samples, concurrency: int, latency: float) -> dict:
    """The same calls made with bare google-genai from a thread pool: the ceiling this machine allows."""
    from concurrent.futures import ThreadPoolExecutor

    from google import genai
    from google.genai import types

    proc, url = start_fake(latency, 0.0, "0")
    try:
        client = genai.Client(api_key="bench-key", http_options=types.HttpOptions(base_url=url,
                                                                                  api_version="v1beta"))

        def one(s):
            parts = [types.Part.from_bytes(data=b, mime_type="image/png") for b in s.images]
            parts.append(types.Part.from_text(text=s.question))
            return client.models.generate_content(model="gemini-3-flash",
                                                  contents=[types.Content(role="user", parts=parts)],
                                                  config=types.GenerateContentConfig(system_instruction="sys"))

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, samples[:concurrency]))
            t0 = time.perf_counter()
            list(pool.map(one, samples[concurrency:]))
            wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    n = len(samples) - concurrency
    return {"problems": n, "wall_s": round(wall, 3), "samples_per_s": round(n / wall, 1),
            "ratio_vs_ideal": round((n / wall) / (concurrency / latency), 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=960)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "teacher_throughput.json"))
    a = p.parse_args()
    from stages.common.world.synth import load

    samples = load(f"synth:train:{a.n + a.concurrency}")
    load_before = os.getloadavg()
    clean = scenario(samples, a.concurrency, a.latency, 0.0, "0", 0.05)
    throttled = scenario(samples, a.concurrency, a.latency, 0.3, "0.05", 0.05)
    bare = sdk_only(samples, a.concurrency, a.latency)
    result = {
        "benchmark": "teacher_throughput",
        "baseline": "ideal rate = concurrency / latency (zero client overhead)",
        "target": {"ratio_vs_ideal": 0.9, "lost_with_30pct_429": 0},
        "config": {"concurrency": a.concurrency, "latency_s": a.latency, "problems": a.n},
        "clean": clean,
        "with_30pct_429": throttled,
        "sdk_only": bare,
        "ratio_vs_sdk_only": round(clean["samples_per_s"] / bare["samples_per_s"], 3),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
        "met": {"throughput": clean["ratio_vs_ideal"] >= 0.9, "zero_lost": throttled["lost"] == 0},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
