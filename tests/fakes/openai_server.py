"""A fake OpenAI-compatible /v1/chat/completions server (what vLLM and SGLang serve), on 127.0.0.1.

`responder(body) -> text` writes the answer; `script([...])` injects faults in arrival order:
"429[:retry_after]", "500", "503", "reset", "length" (finish_reason length), "filter" (content_filter).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from tests.fakes.gemini_server import request_fingerprint


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class FakeOpenAI:
    def __init__(self, responder: Callable[[dict], str] | None = None):
        self.responder = responder or (lambda body: "<caption>x</caption><think>y</think><answer>42</answer>")
        self.lock = threading.Lock()
        self.scripted: list[str] = []
        self.successes: Counter = Counter()
        self.statuses: Counter = Counter()
        self.bodies: list[dict] = []
        self.auth: set[str] = set()
        self.server = _Server(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def script(self, faults: list[str]) -> None:
        with self.lock:
            self.scripted.extend(faults)

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with fake.lock:
                    fake.bodies.append(body)
                    fake.auth.add(self.headers.get("Authorization", ""))
                    fault = fake.scripted.pop(0) if fake.scripted else None
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                if fault and fault.startswith("429"):
                    fake.statuses["429"] += 1
                    self._send(429, {"error": {"message": "slow down"}},
                               {"Retry-After": fault.split(":", 1)[1] if ":" in fault else "0"})
                    return
                if fault in ("500", "503"):
                    fake.statuses[fault] += 1
                    self._send(int(fault), {"error": {"message": "injected"}})
                    return
                if fault == "reset":
                    fake.statuses["reset"] += 1
                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                finish = {"length": "length", "filter": "content_filter"}.get(fault, "stop")
                with fake.lock:
                    fake.successes[request_fingerprint(body)] += 1
                    fake.statuses["200"] += 1
                self._send(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant", "content": fake.responder(body)}}],
                    "usage": {"prompt_tokens": 200, "completion_tokens": 90, "total_tokens": 290,
                              "completion_tokens_details": {"reasoning_tokens": 30}}})

        return Handler
