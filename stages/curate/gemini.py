"""Gemini as teacher, through google-genai (the Developer API; the key comes from the environment).

One synchronous client shared by all worker threads (its httpx pool is thread-safe). google-genai's
own retries stay off: `resilience.call_with_retry` owns retries because the SDK ignores Retry-After
and does not retry connection resets. Every error text that leaves this module is scrubbed of the key.
"""

from __future__ import annotations

import os
import re

from stages.common.contract.errors import PrismError, UsageError
from stages.curate.resilience import RETRYABLE_STATUS, Fatal, Transient, parse_retry_after, transport_failure
from stages.curate.teacher_api import Reply, TeacherRequest, TeacherSpec, as_supported_image

API_KEY_ENV = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # google-genai's own order (its get_env_api_key)
BASE_URL_ENV = "PRISM_GEMINI_BASE_URL"
_GEMINI_ID = re.compile(r"^(models/)?[A-Za-z0-9][\w.-]*$")
_BLOCK_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_SAFETY",
                 "IMAGE_PROHIBITED_CONTENT", "LANGUAGE"}


def parse(text: str) -> TeacherSpec | None:
    """gemini:ID (any model id) or a bare gemini-* id; None for text that names another teacher."""
    explicit = text.startswith("gemini:")
    model = text[len("gemini:"):] if explicit else text
    if not explicit and not model.removeprefix("models/").startswith("gemini"):
        return None
    if not model or not _GEMINI_ID.match(model):
        raise UsageError(f"--teacher {text!r}: {model!r} is not a Gemini model id", hint="e.g. gemini-3-flash")
    return TeacherSpec("gemini", model.removeprefix("models/"))


def api_key() -> str:
    """The key from the environment, exactly as google-genai reads it; a clear error before any work."""
    for name in API_KEY_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    raise PrismError("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment",
                     hint="prism never reads keys from config files or flags; --dry-run needs no key")


def build(spec: TeacherSpec, cfg) -> "GeminiTeacher":
    return GeminiTeacher(spec.model, api_key=api_key(),
                         base_url=cfg.gemini_base_url or os.environ.get(BASE_URL_ENV, ""),
                         timeout_s=cfg.timeout, temperature=cfg.temperature,
                         max_output_tokens=cfg.max_output_tokens, thinking_level=cfg.thinking_level,
                         thinking_budget=cfg.thinking_budget, concurrency=cfg.concurrency)


class GeminiTeacher:
    kind = "gemini"
    concurrent = True
    cacheable = True

    def __init__(self, model: str, api_key: str, base_url: str = "", timeout_s: float = 120.0,
                 temperature: float = 1.0, max_output_tokens: int = 8192, thinking_level: str = "",
                 thinking_budget: int | None = None, concurrency: int = 16):
        from google import genai  # google-genai is the optional `gemini` extra: imported only when used
        from google.genai import types

        self.types = types
        self.model = model
        self.name = model
        self._key = api_key
        opts = {"timeout": int(timeout_s * 1000)}
        if base_url:
            opts.update(base_url=base_url, api_version="v1beta")
        self.client = genai.Client(api_key=api_key, http_options=types.HttpOptions(**opts))
        thinking = {}
        if thinking_level:
            thinking["thinking_level"] = thinking_level.upper()
        if thinking_budget is not None:
            thinking["thinking_budget"] = thinking_budget
        self.thinking = thinking
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens
        # what the cache key must hold: anything that changes the answer
        self.sampling = {"temperature": temperature, "max_output_tokens": max_output_tokens, **thinking}

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "<key>") if self._key else text

    def request_config(self, req: TeacherRequest):
        t = self.types
        return t.GenerateContentConfig(
            system_instruction=req.system, temperature=self.temperature, max_output_tokens=self.max_output_tokens,
            seed=req.seed, thinking_config=t.ThinkingConfig(**self.thinking) if self.thinking else None)

    def contents(self, req: TeacherRequest):
        t = self.types
        parts = []
        for img in req.images:
            data, mime = as_supported_image(img)
            parts.append(t.Part.from_bytes(data=data, mime_type=mime))
        parts.append(t.Part.from_text(text=req.question))
        return [t.Content(role="user", parts=parts)]

    def call(self, req: TeacherRequest) -> Reply:
        from google.genai import errors

        try:
            response = self.client.models.generate_content(model=self.model, contents=self.contents(req),
                                                           config=self.request_config(req))
        except errors.APIError as e:
            outcome = self.classify(e)
            if isinstance(outcome, Reply):  # a 400 is this sample's problem, not an outage
                return outcome
            raise outcome from None
        except Exception as e:
            failure = transport_failure(e)
            if failure is None:
                raise
            raise failure from None
        return self.reply(response)

    def classify(self, e) -> Exception | Reply:
        code = int(getattr(e, "code", 0) or 0)
        detail = self.scrub(f"{code} {getattr(e, 'status', '')}: {getattr(e, 'message', '') or ''}".strip())
        if code in RETRYABLE_STATUS:
            return Transient(f"http_{code}", detail, retry_after=retry_after_of(e))
        if code == 400:
            return Reply(None, "bad_request", {}, detail)
        return Fatal(f"http_{code}", detail)

    def reply(self, response) -> Reply:
        usage = usage_of(getattr(response, "usage_metadata", None))
        feedback = getattr(response, "prompt_feedback", None)
        if feedback is not None and getattr(feedback, "block_reason", None):
            return Reply(None, "blocked", usage, detail=enum_name(feedback.block_reason))
        candidates = getattr(response, "candidates", None) or []
        if not candidates:
            return Reply(None, "empty", usage)
        cand = candidates[0]
        finish = enum_name(getattr(cand, "finish_reason", None))
        parts = (cand.content.parts if cand.content is not None else None) or []
        text = "".join(p.text for p in parts if p.text and not p.thought) or None
        if finish == "MAX_TOKENS":
            return Reply(text, "max_tokens", usage, detail=finish)
        if finish in _BLOCK_FINISH:
            return Reply(text, "blocked", usage, detail=finish)
        if text is None:
            return Reply(None, "empty", usage, detail=finish)
        if finish not in ("STOP", "", "FINISH_REASON_UNSPECIFIED"):
            return Reply(text, "other", usage, detail=finish)
        return Reply(text, "stop", usage, detail=finish)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def enum_name(value) -> str:
    if value is None:
        return ""
    return str(getattr(value, "value", None) or getattr(value, "name", None) or value)


def usage_of(meta) -> dict:
    if meta is None:
        return {}
    prompt = getattr(meta, "prompt_token_count", None) or 0
    output = getattr(meta, "candidates_token_count", None) or 0
    thought = getattr(meta, "thoughts_token_count", None) or 0
    total = getattr(meta, "total_token_count", None) or (prompt + output + thought)
    return {"prompt_tokens": prompt, "output_tokens": output, "thought_tokens": thought, "total_tokens": total}


def retry_after_of(e) -> float | None:
    """Retry-After header, else the RetryInfo detail Google puts in the error body ("retryDelay": "7s")."""
    response = getattr(e, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        try:
            value = headers.get("retry-after")
        except Exception:
            value = None
        if value:
            return parse_retry_after(value)
    details = getattr(e, "details", None)
    error = details.get("error", details) if isinstance(details, dict) else {}
    for d in (error.get("details") or []) if isinstance(error, dict) else []:
        if isinstance(d, dict) and d.get("retryDelay"):
            return parse_retry_after(d["retryDelay"])
    return None
