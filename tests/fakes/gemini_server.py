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
                 usage: tuple[int, int, int] = (300, 120, 80)):
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
                    "statuses": dict(self.statuses)}

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

            def do_GET(self):
                if self.path == "/_stats":
                    self._send_json(200, fake.stats())
                else:
                    self._error(404, "NOT_FOUND", "not found")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
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
    a = p.parse_args(argv)
    rates = {f"429:{a.retry_after}": a.rate_429} if a.rate_429 else {}
    fake = FakeGemini(latency=a.latency, fault_rates=rates, seed=a.seed, port=a.port)
    print(f"PORT {fake.server.server_address[1]}", flush=True)
    try:
        fake.server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
