"""Gemini as teacher, through google-genai (the Developer API; the key comes from the environment).

One synchronous client shared by all worker threads (its httpx pool is thread-safe). google-genai's
own retries stay off: `resilience.call_with_retry` owns retries because the SDK ignores Retry-After
and does not retry connection resets. Every error text that leaves this module is scrubbed of the key.
"""

from __future__ import annotations

from stages.curate.resilience import RETRYABLE_STATUS, Fatal, Transient, parse_retry_after, transport_failure
from stages.curate.teachers import Reply, TeacherRequest

_BLOCK_FINISH = {"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_SAFETY",
                 "IMAGE_PROHIBITED_CONTENT", "LANGUAGE"}


def mime_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return ""


def as_supported_image(data: bytes) -> tuple[bytes, str]:
    """Images go as they are when Gemini reads their format, else re-encoded as PNG."""
    mime = mime_type(data)
    if mime:
        return data, mime
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "image/png"


class GeminiTeacher:
    kind = "gemini"
    concurrent = True
    cacheable = True

    def __init__(self, model: str, api_key: str, base_url: str = "", timeout_s: float = 120.0,
                 temperature: float = 1.0, max_output_tokens: int = 8192, thinking_level: str = "",
                 thinking_budget: int | None = None, concurrency: int = 16):
        from google import genai
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
