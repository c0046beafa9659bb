"""The teachers `prism curate --teacher` knows, one row each in TEACHERS: who writes the demonstrations.

    gemini-3-flash, gemini-2.5-pro, ... (a gemini-* id; any id as "gemini:ID")   google-genai, key from env
    openai:URL#MODEL    any OpenAI-compatible /chat/completions server (vLLM, SGLang, a hosted API)
    hf:CKPT             a local model through the rollout engine (hf or vLLM)
    oracle              the synth oracle (exact); oracle-noisy: with caption errors and reasoning slips

A remote teacher (`concurrent = True`) answers one request per `call`, from many threads; a local one
answers a list per `call_batch`. Both return `Reply` (stages.curate.teacher_api); remote failures surface as
resilience.Transient or resilience.Fatal. Adding a teacher: its module (a class, `parse`, `build`), a row
here, a test (docs/extending.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from stages.common.contract.errors import UsageError
from stages.common.contract.registry import Registry
from stages.common.data.chat import screened_rollout_prompts
from stages.common.models.loading import load_policy, load_processor
from stages.common.protocol import format_response
from stages.common.rollout import SamplingParams, make_engine
from stages.common.world.synth import oracle_demo
from stages.curate import gemini, openai_compat
from stages.curate.teacher_api import FINISH, Reply, TeacherRequest, TeacherSpec  # noqa: F401 (re-exported)

NOISY_DEFAULTS = {"caption_error_rate": 0.2, "reasoning_slip_rate": 0.2}


@dataclass(frozen=True)
class TeacherKind:
    syntax: str                                   # how --teacher names one (help and errors list it)
    parse: Callable[[str], TeacherSpec | None]    # the spec when the text names this kind, else None
    build: Callable[[TeacherSpec, Any], Any]      # (spec, CurateConfig) -> a teacher; checks credentials first
    remote: bool = False                          # calls a server: the plan shows calls, retries and cost
    priced: bool = False                          # stages.curate.pricing knows its per-token prices
    check_credentials: Callable[[], object] | None = None   # before any work (not under --dry-run)
    batch_api: bool = False                       # answers through a provider batch API (--batch)


def parse_teacher(text: str) -> TeacherSpec:
    text = (text or "").strip()
    for _, kind in TEACHERS.items():
        spec = kind.parse(text)
        if spec is not None:
            return spec
    raise UsageError(f"unknown --teacher {text!r}: registered teachers are "
                     + ", ".join(kind.syntax for _, kind in TEACHERS.items()))


def teacher_kind(spec: TeacherSpec) -> TeacherKind:
    return TEACHERS.get(spec.kind)


def make_teacher(spec: TeacherSpec, cfg):
    """Build the teacher a config asks for (checks credentials first: no work starts without them)."""
    return teacher_kind(spec).build(spec, cfg)


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
        self.model = ckpt
        self.name = f"hf:{ckpt}"
        self.batch_size = batch_size
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "max_new_tokens": max_new_tokens}
        self.processor = load_processor(ckpt)
        self.engine = make_engine(engine, load_policy(ckpt, train=False), self.processor,
                                  max_new_tokens=max_new_tokens)

    def call_batch(self, requests: list[TeacherRequest]) -> list[Reply]:
        replies: list[Reply] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            # one seed per chunk: the engine is deterministic given (seed, inputs), which the cache key holds
            params = SamplingParams(n=1, temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                    seed=chunk[0].seed * 1000 + chunk[0].attempt)
            prompts, refused = screened_rollout_prompts([r.sample for r in chunk], self.processor)
            outs = self.engine.generate(prompts, params)
            for i, group in enumerate(outs):
                if i in refused:   # a request the model cannot take: the gate drops it, the tally counts it
                    replies.append(Reply(None, "bad_request", {}, refused[i]))
                    continue
                c = group[0]
                usage = {"output_tokens": len(c.token_ids), "total_tokens": len(c.token_ids)}
                replies.append(Reply(c.text, "max_tokens" if c.finish_reason == "length" else "stop", usage))
        return replies

    def close(self) -> None:
        pass


def parse_oracle(text: str) -> TeacherSpec | None:
    return TeacherSpec("oracle", text) if text in ("oracle", "oracle-noisy") else None


def build_oracle(spec: TeacherSpec, cfg) -> OracleTeacher:
    rates = {k: getattr(cfg, k) for k in NOISY_DEFAULTS}
    if spec.model == "oracle-noisy":
        rates = {k: (NOISY_DEFAULTS[k] if v is None else v) for k, v in rates.items()}
    return OracleTeacher(spec.model, caption_error_rate=rates["caption_error_rate"] or 0.0,
                         reasoning_slip_rate=rates["reasoning_slip_rate"] or 0.0)


def parse_hf(text: str) -> TeacherSpec | None:
    if not text.startswith("hf:"):
        return None
    if not text[3:]:
        raise UsageError("--teacher hf: needs a checkpoint, e.g. hf:out/sft or hf:Qwen/Qwen3-VL-8B-Instruct")
    return TeacherSpec("hf", text[3:], prefix="hf:")


def build_hf(spec: TeacherSpec, cfg) -> HFTeacher:
    return HFTeacher(spec.model, engine=cfg.rollout_engine, temperature=cfg.temperature,
                     max_new_tokens=cfg.max_output_tokens, batch_size=cfg.rollout_batch)


TEACHERS: Registry[TeacherKind] = Registry("teacher", "--teacher")
TEACHERS.register("oracle", TeacherKind("oracle, oracle-noisy", parse_oracle, build_oracle))
TEACHERS.register("openai", TeacherKind("openai:URL#MODEL", openai_compat.parse, openai_compat.build, remote=True))
TEACHERS.register("hf", TeacherKind("hf:CKPT", parse_hf, build_hf))
TEACHERS.register("gemini", TeacherKind("gemini-* (or gemini:ID)", gemini.parse, gemini.build, remote=True,
                                        priced=True, check_credentials=gemini.api_key, batch_api=True))
