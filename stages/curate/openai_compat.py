"""Any OpenAI-compatible chat-completions server as teacher (vLLM or SGLang serving a large VLM, or a
hosted API). Images go as base64 data URLs; a key, if the server wants one, comes from OPENAI_API_KEY."""

from __future__ import annotations

import base64
import os

from stages.common.contract.errors import UsageError
from stages.curate.resilience import RETRYABLE_STATUS, Fatal, Transient, parse_retry_after, transport_failure
from stages.curate.teacher_api import Reply, TeacherRequest, TeacherSpec, as_supported_image

OPENAI_KEY_ENV = "OPENAI_API_KEY"


def parse(text: str) -> TeacherSpec | None:
    if not text.startswith("openai:"):
        return None
    url, sep, model = text[len("openai:"):].partition("#")
    if not sep or not url.startswith(("http://", "https://")) or not model:
        raise UsageError(f"--teacher {text!r}: expected openai:URL#MODEL, e.g. "
                         "openai:http://localhost:8000/v1#Qwen/Qwen3-VL-235B-A22B-Instruct")
    return TeacherSpec("openai", model, url.rstrip("/"), prefix="openai:")


def build(spec: TeacherSpec, cfg) -> "OpenAITeacher":
    return OpenAITeacher(spec.url, spec.model, api_key=os.environ.get(OPENAI_KEY_ENV, ""),
                         timeout_s=cfg.timeout, temperature=cfg.temperature,
                         max_output_tokens=cfg.max_output_tokens, concurrency=cfg.concurrency)


class OpenAITeacher:
    kind = "openai"
    concurrent = True
    cacheable = True

    def __init__(self, url: str, model: str, api_key: str = "", timeout_s: float = 120.0, temperature: float = 1.0,
                 max_output_tokens: int = 8192, concurrency: int = 16):
        import httpx

        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self._key = api_key
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens
        self.sampling = {"temperature": temperature, "max_tokens": max_output_tokens, "url": url}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency + 4,
                                                       max_keepalive_connections=concurrency + 4))

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "<key>") if self._key else text

    def body(self, req: TeacherRequest) -> dict:
        content = []
        for img in req.images:
            data, mime = as_supported_image(img)
            content.append({"type": "image_url",
                            "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}})
        content.append({"type": "text", "text": req.question})
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_output_tokens,
                "seed": req.seed, "messages": [{"role": "system", "content": req.system},
                                               {"role": "user", "content": content}]}

    def call(self, req: TeacherRequest) -> Reply:
        try:
            r = self.client.post(self.url, json=self.body(req))
        except Exception as e:
            failure = transport_failure(e)
            if failure is None:
                raise
            raise failure from None
        if r.status_code != 200:
            detail = self.scrub(f"{r.status_code}: {r.text[:200]}")
            if r.status_code in RETRYABLE_STATUS:
                raise Transient(f"http_{r.status_code}", detail, retry_after=parse_retry_after(r.headers.get("retry-after")))
            if r.status_code == 400:
                return Reply(None, "bad_request", {}, detail)
            raise Fatal(f"http_{r.status_code}", detail)
        try:
            data = r.json()
            choice = data["choices"][0]
            text = choice["message"].get("content")
            finish = choice.get("finish_reason") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise Transient("bad_response", "the server's answer is not a chat completion") from None
        u = data.get("usage") or {}
        thought = ((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
        usage = {"prompt_tokens": u.get("prompt_tokens", 0) or 0,
                 "output_tokens": (u.get("completion_tokens", 0) or 0) - thought, "thought_tokens": thought,
                 "total_tokens": u.get("total_tokens", 0) or 0}
        if finish == "length":
            return Reply(text, "max_tokens", usage, finish)
        if finish == "content_filter":
            return Reply(text, "blocked", usage, finish)
        if not text:
            return Reply(None, "empty", usage, finish)
        return Reply(text, "stop", usage, finish)

    def close(self) -> None:
        self.client.close()
