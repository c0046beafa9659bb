"""`prism curate` options."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.config import CommonConfig, opt
from stages.common.contract.errors import UsageError
from stages.curate.gate import GATES

SELECTS = ("all", "unsolved")


@dataclass
class CurateConfig(CommonConfig):
    # Data
    source: list[str] = opt(help="problems: a prism data dir, *.parquet/*.jsonl (sample schema), ShareGPT *.json, "
                                 "verl parquet, an HF datasets folder, or synth, synth:N, synth:SPLIT:N (repeatable)",
                            group="Data", factory=lambda: ["synth"])
    strict: bool = opt(False, "malformed source rows are fatal (default: skipped, counted and reported)",
                       group="Data")
    limit: int = opt(0, "use only the first N problems after loading (0 = all)", group="Data")

    # Selection
    select: str = opt("all", "which problems go to the teacher: all | unsolved (by the student's pass@k)",
                      group="Selection")
    student: str = opt("", "student checkpoint for --select unsolved", group="Selection")
    k: int = opt(8, "student rollouts per problem", group="Selection")
    max_pass: float = opt(0.0, "keep problems whose student pass rate (correct/k) is at most this",
                          group="Selection")
    student_temperature: float = opt(1.0, "student sampling temperature", group="Selection", cli=False)
    student_max_new_tokens: int = opt(512, "student rollout length", group="Selection", cli=False)
    rollout_engine: str = opt("auto", "rollout engine for the student and hf: teachers: auto | hf | vllm",
                              group="Selection")
    rollout_batch: int = opt(16, "prompts per rollout batch (student, hf: teachers)", group="Selection",
                             cli=False)

    # Teacher
    teacher: str = opt("gemini-3-flash", "gemini model id | openai:URL#MODEL | hf:CKPT | oracle | oracle-noisy",
                       group="Teacher")
    thinking_level: str = opt("", "Gemini thinking level: minimal | low | medium | high (default: the model's)",
                              group="Teacher")
    thinking_budget: int | None = opt(None, "Gemini thinking token budget (older models; overrides nothing "
                                            "when unset)", group="Teacher", cli=False)
    temperature: float = opt(1.0, "teacher sampling temperature", group="Teacher")
    max_output_tokens: int = opt(8192, "teacher output limit (thinking included for Gemini)", group="Teacher")
    caption_error_rate: float | None = opt(None, "oracle noise: share of demos with a wrong caption "
                                                 "(oracle-noisy default 0.2)", group="Teacher")
    reasoning_slip_rate: float | None = opt(None, "oracle noise: share of demos with a reasoning slip "
                                                  "(oracle-noisy default 0.2)", group="Teacher")
    gemini_base_url: str = opt("", "Gemini endpoint override (tests; or env PRISM_GEMINI_BASE_URL)",
                               group="Teacher", cli=False)

    # Batch (the Gemini Batch API: half the price, up to 24 h turnaround; see docs/curate-batch.md)
    batch: bool = opt(False, "send the teacher requests through the Gemini Batch API (50% of the standard price)",
                      group="Batch")
    batch_fallback: bool = opt(False, "ask keys whose batch failed or expired interactively, not in a new batch",
                               group="Batch")
    batch_input: str = opt("auto", "how requests reach a job: file (uploaded JSONL) | inline | auto (inline for "
                                   "shards under batch_inline_mb, else file)", group="Batch")
    batch_inline_mb: float = opt(2.0, "auto: shards smaller than this go inline (the API caps inline at ~20 MB)",
                                 group="Batch", cli=False)
    batch_shard_requests: int = opt(5000, "most requests per batch job", group="Batch")
    batch_shard_mb: float = opt(1024.0, "most MB of JSONL per batch job (the API caps a file at 2 GB)",
                                group="Batch", cli=False)
    batch_queue_tokens: int = opt(0, "most estimated tokens queued in our unfinished jobs at once (0 = no "
                                     "client-side cap; a 429 on create always throttles)", group="Batch")
    batch_poll: float = opt(30.0, "seconds between polls of unfinished jobs", group="Batch")
    batch_retries: int = opt(2, "new batches for keys whose batch failed or expired, before the run stops",
                             group="Batch")
    batch_report: float = opt(60.0, "seconds between plain progress lines when stderr is not a terminal",
                              group="Batch", cli=False)

    # Quality gate
    gate: str = opt("verify", "verify (format + answer vs ground truth) | format | none (keep as written)",
                    group="Quality gate")
    attempts: int = opt(3, "teacher samples per problem until one passes the gate", group="Quality gate")

    # Robustness
    concurrency: int = opt(16, "teacher requests in flight", group="Robustness")
    rpm: float = opt(0.0, "client-side limit in requests per minute (0 = none)", group="Robustness")
    max_retries: int = opt(8, "retries per request on 429/5xx/timeouts/resets before the run stops",
                           group="Robustness")
    backoff: float = opt(1.0, "first retry backoff in seconds (doubles, full jitter, capped by backoff_max)",
                         group="Robustness")
    backoff_max: float = opt(60.0, "longest retry backoff in seconds", group="Robustness", cli=False)
    timeout: float = opt(180.0, "per-request timeout in seconds", group="Robustness")
    prices: dict = opt(help="USD per 1M tokens by model, merged over the built-in table: "
                            "{model: {input: x, output: y}}", group="Robustness", cli=False, factory=dict)
    est_output_tokens: int = opt(1500, "--dry-run cost estimate: output+thought tokens per call",
                                 group="Robustness", cli=False)

    def validate(self) -> None:
        if not self.source:
            raise UsageError("--source is required")
        if self.select not in SELECTS:
            raise UsageError(f"--select {self.select!r}: use all or unsolved")
        if self.select == "unsolved" and not self.student:
            raise UsageError("--select unsolved needs --student CKPT (the model whose failures to target)")
        if self.gate not in GATES:
            raise UsageError(f"--gate {self.gate!r}: use {', '.join(GATES)}")
        for name, low in (("k", 1), ("attempts", 1), ("concurrency", 1), ("max_retries", 0), ("limit", 0),
                          ("rollout_batch", 1), ("max_output_tokens", 1)):
            if getattr(self, name) < low:
                raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, not {getattr(self, name)}")
        if not 0.0 <= self.max_pass <= 1.0:
            raise UsageError(f"--max-pass must be between 0 and 1, not {self.max_pass}")
        for name in ("caption_error_rate", "reasoning_slip_rate"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1, not {v}")
        if self.thinking_level and self.thinking_level.lower() not in ("minimal", "low", "medium", "high"):
            raise UsageError(f"--thinking-level {self.thinking_level!r}: use minimal, low, medium or high")
        if self.rpm < 0 or self.timeout <= 0 or self.backoff < 0:
            raise UsageError("--rpm, --timeout and --backoff must be positive")
        # --teacher is parsed by curate.run first thing (the teacher table imports the teachers' libraries);
        # that --batch needs a Gemini teacher is checked there
        if self.batch:
            if self.batch_input not in ("auto", "file", "inline"):
                raise UsageError(f"--batch-input {self.batch_input!r}: use auto, file or inline")
            if self.batch_shard_requests < 1 or self.batch_retries < 0 or self.batch_queue_tokens < 0:
                raise UsageError("--batch-shard-requests must be at least 1; --batch-retries and "
                                 "--batch-queue-tokens at least 0")
            if self.batch_poll <= 0 or self.batch_shard_mb <= 0 or self.batch_inline_mb < 0:
                raise UsageError("--batch-poll and batch_shard_mb must be positive")
