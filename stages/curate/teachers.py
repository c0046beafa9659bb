"""Teachers: who writes the demonstrations, and the one interface the quality gate calls.

    gemini-3-flash, gemini-2.5-pro, ... (any Gemini id; also "gemini:ID")   google-genai, key from env
    openai:URL#MODEL    any OpenAI-compatible /chat/completions server (vLLM, SGLang, a hosted API)
    hf:CKPT             a local model through the rollout engine (hf or vLLM)
    oracle              the synth oracle (exact); oracle-noisy: with caption errors and reasoning slips

A remote teacher (`concurrent = True`) answers one request per `call`, from many threads; a local one
answers a list per `call_batch`. Both return `Reply`; remote failures surface as resilience.Transient
or resilience.Fatal.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

from prism_cli.errors import PrismError, UsageError

API_KEY_ENV = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # google-genai's own order (its get_env_api_key)
BASE_URL_ENV = "PRISM_GEMINI_BASE_URL"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
NOISY_DEFAULTS = {"caption_error_rate": 0.2, "reasoning_slip_rate": 0.2}

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
    kind: str      # gemini | openai | hf | oracle
    model: str     # model id / checkpoint / "oracle" | "oracle-noisy"
    url: str = ""  # openai only

    @property
    def name(self) -> str:
        return {"gemini": self.model, "openai": f"openai:{self.model}", "hf": f"hf:{self.model}"}.get(
            self.kind, self.model)


_GEMINI_ID = re.compile(r"^(models/)?[A-Za-z0-9][\w.-]*$")


def parse_teacher(text: str) -> TeacherSpec:
    text = (text or "").strip()
    if text in ("oracle", "oracle-noisy"):
        return TeacherSpec("oracle", text)
    if text.startswith("openai:"):
        url, sep, model = text[len("openai:"):].partition("#")
        if not sep or not url.startswith(("http://", "https://")) or not model:
            raise UsageError(f"--teacher {text!r}: expected openai:URL#MODEL, e.g. "
                             "openai:http://localhost:8000/v1#Qwen/Qwen3-VL-235B-A22B-Instruct")
        return TeacherSpec("openai", model, url.rstrip("/"))
    if text.startswith("hf:"):
        if not text[3:]:
            raise UsageError("--teacher hf: needs a checkpoint, e.g. hf:out/sft or hf:Qwen/Qwen3-VL-8B-Instruct")
        return TeacherSpec("hf", text[3:])
    model = text[len("gemini:"):] if text.startswith("gemini:") else text
    if not model or not _GEMINI_ID.match(model):
        raise UsageError(f"--teacher {text!r} is not a teacher",
                         hint="use a Gemini model id (gemini-3-flash), openai:URL#MODEL, hf:CKPT, oracle or "
                              "oracle-noisy")
    return TeacherSpec("gemini", model.removeprefix("models/"))


def gemini_api_key() -> str:
    """The key from the environment, exactly as google-genai reads it; a clear error before any work."""
    for name in API_KEY_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    raise PrismError("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment",
                     hint="prism never reads keys from config files or flags; --dry-run needs no key")


def make_teacher(spec: TeacherSpec, cfg):
    """Build the teacher a config asks for (checks credentials first: no work starts without them)."""
    if spec.kind == "gemini":
        from stages.curate.gemini import GeminiTeacher

        return GeminiTeacher(spec.model, api_key=gemini_api_key(),
                             base_url=cfg.gemini_base_url or os.environ.get(BASE_URL_ENV, ""),
                             timeout_s=cfg.timeout, temperature=cfg.temperature,
                             max_output_tokens=cfg.max_output_tokens, thinking_level=cfg.thinking_level,
                             thinking_budget=cfg.thinking_budget, concurrency=cfg.concurrency)
    if spec.kind == "openai":
        from stages.curate.openai_compat import OpenAITeacher

        return OpenAITeacher(spec.url, spec.model, api_key=os.environ.get(OPENAI_KEY_ENV, ""),
                             timeout_s=cfg.timeout, temperature=cfg.temperature,
                             max_output_tokens=cfg.max_output_tokens, concurrency=cfg.concurrency)
    if spec.kind == "hf":
        return HFTeacher(spec.model, engine=cfg.rollout_engine, temperature=cfg.temperature,
                         max_new_tokens=cfg.max_output_tokens, batch_size=cfg.rollout_batch)
    rates = {k: getattr(cfg, k) for k in NOISY_DEFAULTS}
    if spec.model == "oracle-noisy":
        rates = {k: (NOISY_DEFAULTS[k] if v is None else v) for k, v in rates.items()}
    return OracleTeacher(spec.model, caption_error_rate=rates["caption_error_rate"] or 0.0,
                         reasoning_slip_rate=rates["reasoning_slip_rate"] or 0.0)


class OracleTeacher:
    """The synth oracle: exact (or deliberately noisy) demonstrations, instantly, for free."""

    kind = "oracle"
    concurrent = False
    cacheable = False  # deterministic and free: nothing to save

    def __init__(self, model: str, caption_error_rate: float = 0.0, reasoning_slip_rate: float = 0.0):
        self.model = model
        self.name = model
        self.rates = {"caption_error_rate": caption_error_rate, "reasoning_slip_rate": reasoning_slip_rate}
        self.sampling = dict(self.rates)

    def call_batch(self, requests: list[TeacherRequest]) -> list[Reply]:
        from stages.common.protocol import format_response
        from stages.common.synth import oracle_demo

        replies = []
        for req in requests:
            noisy = any(self.rates.values())
            rng = random.Random(f"oracle/{req.sample.id}/{req.seed}/{req.attempt}") if noisy else None
            demo = oracle_demo(req.sample, rng=rng, **self.rates)
            replies.append(Reply(format_response(demo.caption, demo.think, demo.answer), "stop",
                                 usage={}, detail=_oracle_detail(demo.usage)))
        return replies

    def close(self) -> None:
        pass


def _oracle_detail(info: dict) -> str:
    notes = [f"{k}={v}" for k, v in sorted((info or {}).items()) if k in ("caption_error", "reasoning_slip") and v]
    return ",".join(notes)


class HFTeacher:
    """A local model as teacher, through the same rollout engine the student uses."""

    kind = "hf"
    concurrent = False
    cacheable = True

    def __init__(self, ckpt: str, engine: str = "auto", temperature: float = 1.0, max_new_tokens: int = 1024,
                 batch_size: int = 16):
        from stages.common.models import load_policy, load_processor
        from stages.common.rollout import make_engine

        self.model = ckpt
        self.name = f"hf:{ckpt}"
        self.batch_size = batch_size
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "max_new_tokens": max_new_tokens}
        self.processor = load_processor(ckpt)
        self.engine = make_engine(engine, load_policy(ckpt, train=False), self.processor)

    def call_batch(self, requests: list[TeacherRequest]) -> list[Reply]:
        from stages.common.chat import rollout_prompt
        from stages.common.rollout import SamplingParams

        replies: list[Reply] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            # one seed per chunk: the engine is deterministic given (seed, inputs), which the cache key holds
            params = SamplingParams(n=1, temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                    seed=chunk[0].seed * 1000 + chunk[0].attempt)
            outs = self.engine.generate([rollout_prompt(r.sample) for r in chunk], params)
            for group in outs:
                c = group[0]
                usage = {"output_tokens": len(c.token_ids), "total_tokens": len(c.token_ids)}
                replies.append(Reply(c.text, "max_tokens" if c.finish_reason == "length" else "stop", usage))
        return replies

    def close(self) -> None:
        pass
