"""What every teacher shares: the request it answers, the Reply it returns, the TeacherSpec --teacher parses to,
and the image encoding remote teachers send. Teacher modules import this; stages.curate.teachers (the table of
teachers) imports them, so nothing here imports a teacher."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

# finish values a Reply can carry; everything but "stop" is a rejection reason of its own
FINISH = ("stop", "max_tokens", "blocked", "empty", "bad_request", "other")


@dataclass
class TeacherRequest:
    system: str
    question: str
    images: list[bytes]
    attempt: int
    seed: int
    sample: Any = None   # the Sample (local teachers need more than the prompt); never hashed


@dataclass
class Reply:
    text: str | None
    finish: str = "stop"
    usage: dict = field(default_factory=dict)   # prompt_tokens, output_tokens, thought_tokens, total_tokens
    detail: str = ""                            # block reason, provider finish reason

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Reply":
        return cls(**{k: d.get(k) for k in ("text", "finish", "usage", "detail") if k in d})


@dataclass(frozen=True)
class TeacherSpec:
    kind: str      # a row of stages.curate.teachers.TEACHERS: gemini | openai | hf | oracle
    model: str     # model id / checkpoint / "oracle" | "oracle-noisy"
    url: str = ""  # openai only
    prefix: str = ""   # what the teacher's name puts before the model ("hf:"), as its parse wrote it

    @property
    def name(self) -> str:
        return self.prefix + self.model


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
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "image/png"
