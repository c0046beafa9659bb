"""SFTConfig: every knob of `prism sft`. Paper defaults: lr 1e-5, cosine, warmup 0.1, 1 epoch, full FT."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.config import CommonConfig, HardwareConfig, opt
from stages.common.contract.errors import UsageError
from stages.common.evaluation.options import HeldOutEvalConfig, check_eval_options
from stages.common.plan.report import check_plan_options


@dataclass
class SFTConfig(HeldOutEvalConfig, HardwareConfig, CommonConfig):
    ckpt: str = opt("tiny", "policy to fine-tune: tiny, an HF dir or hub id, or a prism checkpoint", group="Model")
    data: list[str] = opt(help="training data (repeatable), optionally weighted: out/curated, a.parquet:0.9, "
                               "synth:0.1", group="Data", factory=lambda: ["synth"])
    eval_fraction: float = opt(0.05, "held-out fraction of the data for eval loss", group="Data")
    max_length: int = opt(8192, "max tokens per sample (responses are truncated, never image tokens)", group="Data")
    min_pixels: int | None = opt(None, "image lower pixel bound (processor default when unset)", group="Data")
    max_pixels: int | None = opt(None, "image upper pixel bound (processor default when unset)", group="Data")
    system_prompt: bool = opt(True, "prepend the protocol system prompt to every sample", group="Data", cli=False)

    epochs: float = opt(1.0, "passes over the data", group="Training")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: from epochs)", group="Training")
    lr: float = opt(1e-5, "peak learning rate", group="Training")
    schedule: str = opt("cosine", "lr schedule: cosine, linear or constant", group="Training")
    warmup: float = opt(0.1, "warmup: ratio of steps if < 1, else a step count", group="Training")
    weight_decay: float = opt(0.0, "AdamW weight decay", group="Training")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)", group="Training")
    batch_size: int = opt(32, "samples per optimizer step, over all processes", group="Training")
    micro_batch_size: int = opt(8, "samples per forward pass per process (packed into one row)", group="Training")
    compile: bool = opt(False, "compile the policy's decoder layers with torch.compile (faster steps after a "
                               "one-time compile; see docs/compile.md)", group="Hardware")
    packing: str | bool = opt("auto", "auto: pack a micro-batch into one padding-free row with flash-attention-2 "
                                "(varlen), else pad length-grouped micro-batches; on; off", group="Training")


    log_every: int = opt(1, "log metrics every N steps", group="Logging")
    eval_every: int = opt(50, "eval loss (and, with --eval-tasks, the held-out evaluation) every N steps and at the end",
                          group="Logging")
    save_every: int = opt(50, "save resumable state every N steps", group="Logging")
    report_to: str = opt("none", "trackers through accelerate: none, tensorboard, wandb", group="Logging")
    keep_state: bool = opt(False, "keep optimizer state in the final checkpoint", group="Output", cli=False)


    eval_max_new_tokens: int = opt(1024, "max response tokens of an evaluation", group="Evaluation")

    def validate(self) -> None:
        check_plan_options(self.gpu_memory, self.backend, self.world_size)
        check_eval_options(self)
        if self.batch_size <= 0 or self.micro_batch_size <= 0:
            raise UsageError("batch_size and micro_batch_size must be positive")
        if self.batch_size % self.micro_batch_size:
            raise UsageError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise UsageError(f"unknown schedule {self.schedule!r}", hint="use cosine, linear or constant")
        if not 0 <= self.eval_fraction < 1:
            raise UsageError("eval_fraction must be in [0, 1)")
        if isinstance(self.packing, bool):  # YAML reads an unquoted on/off as a boolean
            self.packing = "on" if self.packing else "off"
        if self.packing not in ("auto", "on", "off"):
            raise UsageError(f"unknown packing {self.packing!r}", hint="use auto, on or off")
        if not self.data:
            raise UsageError("--data is required")
