"""A fake Gemini REST server speaking the generateContent protocol the real google-genai client uses.

    with FakeGemini(responder=lambda req: "<caption>..</caption>...") as fake:
        client = genai.Client(api_key="k", http_options={"base_url": fake.url, "api_version": "v1beta"})

Faults are scripted two ways, both usable at once:
- `fake.script(["429:1", "500", "reset", ...])`: the next requests (in arrival order) get these faults;
- `FakeGemini(fault_rates={"429": 0.3}, seed=0)`: each request draws a fault at random.
Fault names: "429[:retry_after_s]", "500", "503", "400", "401", "timeout" (sleep `hang_s` then answer
nothing), "reset" (TCP reset after reading the request), "blocked" (promptFeedback.blockReason),
"max_tokens" (finishReason MAX_TOKENS, truncated text), "malformed" (text without the protocol tags).

Every 200 answer with a candidate or a block is a *successful request*, counted per request fingerprint
(sha256 of the canonical request body) so tests can check that nothing paid for was asked twice.
`hold()` parks every later request until `release()`; parked requests are then dropped without an
answer (and without being counted): the SIGKILL test kills its client while they hang.
The Batch API and the Files API are served too, as google-genai's Developer-API client speaks them:
POST /v1beta/models/M:batchGenerateContent (inline `requests` or an uploaded `fileName`), GET /v1beta/batches
(list), GET /v1beta/batches/ID, POST /v1beta/batches/ID:cancel, the resumable upload POST /upload/v1beta/files
(start, then chunks to the X-Goog-Upload-URL) and GET /v1beta/files/NAME:download?alt=media. A job stays
PENDING then RUNNING for `batch_delay` seconds and then answers every line at once, through the same
responder, faults and success counters as generateContent. `batch_script([...])` scripts the next
creates: "ok", "expired", "failed", "cancelled", or "429[:retry_after_s]" (the create itself is refused);
per-line faults come from `script`/`fault_rates` ("500", "429", "400" become that line's error).
Run alone (benchmarks): `python -m tests.fakes.gemini_server --latency 0.05` prints `PORT <n>`;
GET /_stats returns the counters as JSON.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_PATH = re.compile(r"^/(v1beta|v1|v1alpha)/models/([^/:]+):generateContent$")
_BATCH_CREATE = re.compile(r"^/(v1beta|v1|v1alpha)/models/([^/:]+):batchGenerateContent$")
_BATCH = re.compile(r"^/(v1beta|v1|v1alpha)/batches/([^/:]+)(:cancel)?$")
_BATCHES = re.compile(r"^/(v1beta|v1|v1alpha)/batches$")
_UPLOAD = re.compile(r"^/upload/(v1beta|v1|v1alpha)/files$")
_DOWNLOAD = re.compile(r"^(?:/download)?/(v1beta|v1|v1alpha)/files/([^/:]+):download$")
# a line's injected fault -> the google.rpc.Status the batch result carries for it
_LINE_ERRORS = {"400": (3, "INVALID_ARGUMENT"), "401": (16, "UNAUTHENTICATED"), "429": (8, "RESOURCE_EXHAUSTED"),
                "500": (13, "INTERNAL"), "503": (14, "UNAVAILABLE"), "timeout": (4, "DEADLINE_EXCEEDED"),
                "reset": (14, "UNAVAILABLE")}
_TERMINAL = {"ok": "BATCH_STATE_SUCCEEDED", "expired": "BATCH_STATE_EXPIRED", "failed": "BATCH_STATE_FAILED",
             "cancelled": "BATCH_STATE_CANCELLED"}


def use_only_key(monkeypatch, key: str) -> str:
    """The environment a curate test runs in: GEMINI_API_KEY=key and no other key or base URL, so the client
    reaches the fake only through the config's gemini_base_url, and leak checks can grep for `key`."""
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", key)
    monkeypatch.delenv("PRISM_GEMINI_BASE_URL", raising=False)
    return key


def request_fingerprint(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def get(d: dict, *names, default=None):
    """The REST body mixes snake_case and camelCase depending on the client: accept both."""
    for n in names:
        if isinstance(d, dict) and n in d:
            return d[n]
    return default


def request_text(body: dict) -> str:
    texts = []
    for content in get(body, "contents", default=[]) or []:
        for part in get(content, "parts", default=[]) or []:
            if get(part, "text") is not None:
                texts.append(get(part, "text"))
    return "\n".join(texts)


def request_images(body: dict) -> list[bytes]:
    out = []
    for content in get(body, "contents", default=[]) or []:
        for part in get(content, "parts", default=[]) or []:
            inline = get(part, "inlineData", "inline_data")
            if inline:
                out.append(b64decode_any(get(inline, "data", default="")))
    return out


def b64decode_any(text: str) -> bytes:
    """google-genai sends URL-safe base64, possibly unpadded; the real API takes either alphabet."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def default_responder(body: dict) -> str:
    return "<caption>- a fake image</caption>\n<think>nothing to see</think>\n<answer>42</answer>"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default backlog of 5 drops connections when 16 clients connect at once.
    request_queue_size = 256


class FakeGemini:
    def __init__(self, responder: Callable[[dict], str] | None = None, latency: float = 0.0,
                 fault_rates: dict | None = None, seed: int = 0, hang_s: float = 5.0, port: int = 0,
                 usage: tuple[int, int, int] = (300, 120, 80), batch_delay: float = 0.0):
        self.responder = responder or default_responder
        self.latency = latency
        self.fault_rates = dict(fault_rates or {})
        self.hang_s = hang_s
        self.usage = usage
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.scripted: list[str] = []
        self.successes: Counter = Counter()     # fingerprint -> 200 answers
        self.statuses: Counter = Counter()      # "200" / "429" / "reset" / ... -> count
        self.requests = 0
        self.api_keys: set[str] = set()
        self.bodies: list[dict] = []
        self.keep_bodies = False
        self._held = threading.Event()
        self._released = threading.Event()
        # Batch and Files API
        self.batch_delay = batch_delay
        self.batch_scripted: list[str] = []
        self.batch_calls: Counter = Counter()   # create / create_429 / get / list / cancel / upload / download
        self.jobs: dict[str, dict] = {}         # "batches/ID" -> job
        self.files: dict[str, bytes] = {}       # "files/ID" -> content
        self.file_meta: dict[str, dict] = {}
        self.uploads: dict[str, dict] = {}      # upload id -> {"meta", "data"}
        self._ids = 0
        self.http_requests = 0                  # every HTTP request, any endpoint (benchmarks)
        self.max_active_jobs = 0                # most unfinished jobs at once (queued-token tests)
        self._job_lock = threading.Lock()  # one job advances (and is answered) once
        self.server = _Server(("127.0.0.1", port), self._handler_class())
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def script(self, faults: list[str]) -> None:
        with self.lock:
            self.scripted.extend(faults)

    def hold(self) -> None:
        self._released.clear()
        self._held.set()

    def release(self) -> None:
        self._held.clear()
        self._released.set()

    def total_successes(self) -> int:
        with self.lock:
            return sum(self.successes.values())

    def repeated(self) -> dict:
        with self.lock:
            return {k: v for k, v in self.successes.items() if v > 1}

    def stats(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "successes": sum(self.successes.values()),
                    "distinct": len(self.successes), "repeated": sum(v - 1 for v in self.successes.values()),
                    "statuses": dict(self.statuses), "batch_calls": dict(self.batch_calls),
                    "jobs": len(self.jobs), "max_active_jobs": self.max_active_jobs,
                    "http_requests": self.http_requests}

    def batch_script(self, outcomes: list[str]) -> None:
        with self.lock:
            self.batch_scripted.extend(outcomes)

    def jobs_created(self) -> list[str]:
        with self.lock:
            return list(self.jobs)

    def start(self) -> "FakeGemini":
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ behaviour
    def _next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.scripted:
                return self.scripted.pop(0)
            draw = self.rng.random()
        acc = 0.0
        for name, rate in self.fault_rates.items():
            acc += rate
            if draw < acc:
                return name
        return None

    def _count(self, status: str, fingerprint: str | None = None) -> None:
        with self.lock:
            self.statuses[status] += 1
            if fingerprint is not None:
                self.successes[fingerprint] += 1

    def _answer(self, body: dict, fault: str | None) -> dict:
        prompt, out, thoughts = self.usage
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": out, "thoughtsTokenCount": thoughts,
                 "totalTokenCount": prompt + out + thoughts}
        if fault == "blocked":
            return {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": prompt,
                                                                                   "totalTokenCount": prompt}}
        text = self.responder(body)
        finish = "STOP"
        if fault == "max_tokens":
            text, finish = text[: max(1, len(text) // 3)], "MAX_TOKENS"
        elif fault == "malformed":
            text = "I think the answer is probably 42, but I will not use any tags."
        parts = [{"text": "(thinking about it)", "thought": True}, {"text": text}]
        return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish,
                                "index": 0}],
                "usageMetadata": usage, "modelVersion": "fake-gemini"}

    # ------------------------------------------------------------------ batch behaviour
    def _new_id(self, prefix: str) -> str:
        with self.lock:
            self._ids += 1
            return f"{prefix}{self._ids:06d}"

    def _create_job(self, model: str, batch: dict) -> dict | tuple[int, str]:
        """A new job, or (status, retry_after) when the script refuses the create."""
        with self.lock:
            outcome = self.batch_scripted.pop(0) if self.batch_scripted else "ok"
        if outcome.startswith("429"):
            return 429, (outcome.split(":", 1)[1] if ":" in outcome else "1")
        source = get(batch, "inputConfig", "input_config", default={}) or {}
        file_name = get(source, "fileName", "file_name")
        if file_name:
            if file_name not in self.files:
                return 400, f"unknown input file {file_name}"
            lines = [json.loads(x) for x in self.files[file_name].splitlines() if x.strip()]
            inline = None
        else:
            requests = get(get(source, "requests", default={}), "requests", default=[]) or []
            lines = [{"key": None, "metadata": get(r, "metadata"), "request": get(r, "request", default={})}
                     for r in requests]
            inline = True
        with self.lock:
            running = list(self.jobs.values())
        for other in running:
            self._advance_job(other)
        active = sum(j["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING") for j in running) + 1
        self.max_active_jobs = max(self.max_active_jobs, active)
        name = self._new_id("batches/fake")
        job = {"name": name, "model": model, "display": get(batch, "displayName", "display_name", default=""),
               "lines": lines, "inline": bool(inline), "outcome": outcome, "created": time.monotonic(),
               "state": "BATCH_STATE_PENDING", "output": None, "stats": None}
        with self.lock:
            self.jobs[name] = job
        return job

    def _advance_job(self, job: dict) -> None:
        """Move a job on in time; on reaching its end, answer every line (once)."""
        with self._job_lock:
            self._advance_job_locked(job)

    def _advance_job_locked(self, job: dict) -> None:
        if job["state"] not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
            return
        age = time.monotonic() - job["created"]
        if age < self.batch_delay:
            job["state"] = "BATCH_STATE_RUNNING" if age >= self.batch_delay / 2 else "BATCH_STATE_PENDING"
            return
        job["state"] = _TERMINAL.get(job["outcome"], "BATCH_STATE_SUCCEEDED")
        if job["state"] != "BATCH_STATE_SUCCEEDED":
            return
        results, ok = [], 0
        for line in job["lines"]:
            body = line["request"]
            fault = self._next_fault()
            out: dict = {}
            if fault in _LINE_ERRORS or (fault or "").startswith("429"):
                code, status = _LINE_ERRORS[fault.split(":")[0]]
                self._count(fault.split(":")[0])
                out["error"] = {"code": code, "message": f"injected {fault} ({status})"}  # a google.rpc.Status
            else:
                out["response"] = self._answer(body, fault)
                self._count("200", request_fingerprint({"model": job["model"], **body}))
                ok += 1
            if job["inline"]:
                if line.get("metadata") is not None:
                    out["metadata"] = line["metadata"]
            else:
                out = {"key": line.get("key"), **out}
            results.append(out)
        job["stats"] = {"requestCount": str(len(results)), "successfulRequestCount": str(ok),
                        "failedRequestCount": str(len(results) - ok)}
        if job["inline"]:
            job["output"] = {"inlinedResponses": {"inlinedResponses": results}}
        else:
            file_name = "files/batch-" + job["name"].split("/")[-1]
            with self.lock:
                self.files[file_name] = "".join(json.dumps(r) + "\n" for r in results).encode()
            job["output"] = {"responsesFile": file_name}
        job["lines"] = []

    def _job_json(self, job: dict) -> dict:
        meta = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                "model": f"models/{job['model']}", "displayName": job["display"], "state": job["state"],
                "createTime": "2026-12-01T00:00:00Z", "updateTime": "2026-12-01T00:00:00Z"}
        if job["stats"]:
            meta["batchStats"] = job["stats"]
        if job["output"] is not None:
            meta["output"] = job["output"]
        done = job["state"] not in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
        return {"name": job["name"], "metadata": meta, "done": done}

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real API
            # Headers and body go out in separate writes: without TCP_NODELAY, Nagle plus the client's
            # delayed ACK adds ~40 ms to every answer.
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def _send_json(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def _error(self, code: int, status: str, message: str, headers: dict | None = None) -> None:
                self._send_json(code, {"error": {"code": code, "message": message, "status": status}}, headers)

            def _authorized(self) -> bool:
                key = self.headers.get("x-goog-api-key", "")
                with fake.lock:
                    fake.api_keys.add(key)
                if not key:
                    self._error(401, "UNAUTHENTICATED", "API key missing")
                return bool(key)

            def do_GET(self):
                path, _, query = self.path.partition("?")
                if path == "/_stats":
                    self._send_json(200, fake.stats())
                    return
                with fake.lock:
                    fake.http_requests += 1
                if not self._authorized():
                    return
                if _BATCHES.match(path):
                    fake.batch_calls["list"] += 1
                    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
                    size, start = int(params.get("pageSize", 50)), int(params.get("pageToken", 0) or 0)
                    with fake.lock:
                        jobs = list(fake.jobs.values())
                    for job in jobs:
                        fake._advance_job(job)
                    page = {"operations": [fake._job_json(j) for j in jobs[start:start + size]]}
                    if start + size < len(jobs):
                        page["nextPageToken"] = str(start + size)
                    self._send_json(200, page)
                elif m := _BATCH.match(path):
                    fake.batch_calls["get"] += 1
                    job = fake.jobs.get(f"batches/{m.group(2)}")
                    if job is None:
                        self._error(404, "NOT_FOUND", f"batch {m.group(2)} not found")
                        return
                    fake._advance_job(job)
                    self._send_json(200, fake._job_json(job))
                elif m := _DOWNLOAD.match(path):
                    fake.batch_calls["download"] += 1
                    data = fake.files.get(f"files/{m.group(2)}")
                    if data is None:
                        self._error(404, "NOT_FOUND", f"file {m.group(2)} not found")
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                else:
                    self._error(404, "NOT_FOUND", "not found")

            def _batch_post(self, path: str, raw: bytes) -> bool:
                """The Batch and Files API POSTs; False when the path is none of theirs."""
                if "upload_id=" in self.path:  # a resumable upload chunk (authorised by its upload id)
                    upload_id = self.path.split("upload_id=")[1].split("&")[0]
                    up = fake.uploads.get(upload_id)
                    if up is None:
                        self._error(404, "NOT_FOUND", "unknown upload")
                        return True
                    if int(self.headers.get("X-Goog-Upload-Offset", "0")) != len(up["data"]):
                        self._error(400, "INVALID_ARGUMENT", "upload offset mismatch")
                        return True
                    up["data"] += raw
                    if "finalize" not in self.headers.get("X-Goog-Upload-Command", ""):
                        self._send_json(200, {}, {"X-Goog-Upload-Status": "active"})
                        return True
                    name = fake._new_id("files/fakefile")
                    with fake.lock:
                        fake.files[name] = bytes(up["data"])
                        del fake.uploads[upload_id]
                    meta = {"name": name, "mimeType": up["meta"].get("mimeType", ""),
                            "sizeBytes": str(len(fake.files[name])), "state": "ACTIVE",
                            "displayName": up["meta"].get("displayName", ""), "source": "UPLOADED"}
                    fake.file_meta[name] = meta
                    fake.batch_calls["upload"] += 1
                    self._send_json(200, {"file": meta}, {"X-Goog-Upload-Status": "final"})
                    return True
                if _UPLOAD.match(path):
                    if not self._authorized():
                        return True
                    if self.headers.get("X-Goog-Upload-Command") != "start":
                        self._error(400, "INVALID_ARGUMENT", "expected a resumable upload start")
                        return True
                    upload_id = fake._new_id("up")
                    fake.uploads[upload_id] = {"meta": (json.loads(raw or b"{}").get("file") or {}), "data": b""}
                    url = f"{fake.url}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
                    self._send_json(200, {}, {"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})
                    return True
                if m := _BATCH_CREATE.match(path):
                    if not self._authorized():
                        return True
                    made = fake._create_job(m.group(2), json.loads(raw).get("batch", {}))
                    if isinstance(made, tuple):
                        code, detail = made
                        if code == 429:
                            fake.batch_calls["create_429"] += 1
                            self._error(429, "RESOURCE_EXHAUSTED", "enqueued tokens over the limit",
                                        {"Retry-After": detail})
                        else:
                            self._error(code, "INVALID_ARGUMENT", detail)
                        return True
                    fake.batch_calls["create"] += 1
                    self._send_json(200, fake._job_json(made))
                    return True
                if (m := _BATCH.match(path)) and m.group(3):
                    if not self._authorized():
                        return True
                    fake.batch_calls["cancel"] += 1
                    job = fake.jobs.get(f"batches/{m.group(2)}")
                    if job is None:
                        self._error(404, "NOT_FOUND", "no such batch")
                        return True
                    if job["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
                        job["state"] = "BATCH_STATE_CANCELLED"
                    self._send_json(200, {})
                    return True
                return False

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with fake.lock:
                    fake.http_requests += 1
                if self._batch_post(self.path.split("?")[0], raw):
                    return
                match = _PATH.match(self.path.split("?")[0])
                if not match:
                    self._error(404, "NOT_FOUND", f"unknown path {self.path}")
                    return
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._error(400, "INVALID_ARGUMENT", "request body is not JSON")
                    return
                key = self.headers.get("x-goog-api-key", "")
                with fake.lock:
                    fake.api_keys.add(key)
                    if fake.keep_bodies:
                        fake.bodies.append(body)
                if not key:
                    self._error(401, "UNAUTHENTICATED", "API key missing")
                    return
                if fake._held.is_set():
                    self._park()
                    return
                fault = fake._next_fault()
                if fake.latency:
                    time.sleep(fake.latency)
                if fake._held.is_set():  # held while this one was "thinking": it is parked too
                    self._park()
                    return
                if fault and fault.startswith("429"):
                    after = fault.split(":", 1)[1] if ":" in fault else "1"
                    fake._count("429")
                    self._error(429, "RESOURCE_EXHAUSTED", "quota exceeded", {"Retry-After": after})
                elif fault in ("500", "503", "400", "401"):
                    fake._count(fault)
                    names = {"500": "INTERNAL", "503": "UNAVAILABLE", "400": "INVALID_ARGUMENT",
                             "401": "UNAUTHENTICATED"}
                    self._error(int(fault), names[fault], f"injected {fault}")
                elif fault == "timeout":
                    fake._count("timeout")
                    time.sleep(fake.hang_s)
                    self._reset()
                elif fault == "reset":
                    fake._count("reset")
                    self._reset()
                else:
                    answer = fake._answer(body, fault)
                    fake._count("200", request_fingerprint({"model": match.group(2), **body}))
                    self._send_json(200, answer)

            def _park(self) -> None:
                fake._released.wait(60)
                fake._count("dropped")
                self._reset()

            def _reset(self) -> None:
                """Close with RST (SO_LINGER 0): the client sees a connection reset, not a clean close."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass

        return Handler


def main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--rate-429", type=float, default=0.0)
    p.add_argument("--retry-after", type=str, default="0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-delay", type=float, default=0.0, help="seconds a batch job runs before answering")
    a = p.parse_args(argv)
    rates = {f"429:{a.retry_after}": a.rate_429} if a.rate_429 else {}
    fake = FakeGemini(latency=a.latency, fault_rates=rates, seed=a.seed, port=a.port, batch_delay=a.batch_delay)
    print(f"PORT {fake.server.server_address[1]}", flush=True)
    try:
        fake.server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
