"""EvalConfig: `prism eval --ckpt CKPT [--ckpt CKPT ...] --tasks synth,mathvista,...` and `prism eval --compare`."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.config import CommonConfig, opt
from stages.common.contract.errors import UsageError
from stages.eval.tasks import task_names

SYNTH_BACKENDS = ("native", "lmms")


@dataclass
class EvalConfig(CommonConfig):
    ckpt: list[str] = opt(help="checkpoint(s) to evaluate (repeatable): a prism checkpoint, an HF model dir or hub "
                               "id, or tiny", group="Model", factory=list)
    tasks: list[str] = opt(help=f"comma-separated: {', '.join(task_names())}, or any lmms-eval task name",
                           group="Tasks",
                           factory=lambda: ["synth"])
    synth: str = opt("synth:test:200", "the synth split evaluated by the synth task (synth[:test][:N][:dK])",
                     group="Tasks")
    synth_backend: str = opt("native", "run synth natively or as a local lmms-eval task (lmms)", group="Tasks")
    task_data: list[str] = opt(help="NAME=DIR (repeatable): read task NAME (an alias such as mathvista, or an lmms-eval "
                                    "task name) from a local copy: a save_to_disk folder, a hub snapshot or parquet "
                                    "files (docs/eval-offline.md)", group="Tasks", factory=list)
    limit: int = opt(0, "evaluate only the first N samples of each task (0: all)", group="Tasks")

    judge: str = opt("none", "none: rule-based scoring everywhere; URL#MODEL: an OpenAI-compatible judge for the "
                             "tasks whose official scorer is a judge (key from $OPENAI_API_KEY)", group="Scoring")

    engine: str = opt("auto", "rollout engine: auto (vllm on a GPU when installed, else hf), hf, vllm",
                      group="Generation")
    max_new_tokens: int = opt(4096, "max response tokens (a task's own smaller limit wins)", group="Generation")
    batch_size: int = opt(16, "prompts per generate call", group="Generation")
    dtype: str = opt("auto", "auto, bf16, fp16 or fp32", group="Generation", cli=False)

    compare: list[str] = opt(help="print the paper-style table of these eval directories (repeatable or "
                                  "comma-separated) and exit", group="Compare", factory=list)
    markdown: str = opt("", "also write the comparison table as Markdown to this file", group="Compare")
    bootstrap: int = opt(10_000, "bootstrap replicates of the paired differences (seeded by --seed)",
                         group="Compare")

    def validate(self) -> None:
        if self.synth_backend not in SYNTH_BACKENDS:
            raise UsageError(f"--synth-backend must be native or lmms, not {self.synth_backend!r}")
        if self.bootstrap < 1:
            raise UsageError("--bootstrap must be >= 1")
        for name in ("limit", "max_new_tokens", "batch_size"):
            if getattr(self, name) < (0 if name == "limit" else 1):
                raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'limit' else '>= 1'}")
        if not self.compare and not self.ckpt:
            raise UsageError("--ckpt is required", hint="or --compare DIR to tabulate finished evaluations")
