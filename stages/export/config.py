"""ExportConfig: `prism export --ckpt DIR --out HF_DIR [--dtype bf16] [--what policy|discriminator]`."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.config import CommonConfig, opt
from stages.common.contract.errors import UsageError

WHATS = ("policy", "discriminator")
DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class ExportConfig(CommonConfig):
    ckpt: str = opt("", "checkpoint to export: a prism checkpoint (sft/align/rl), an HF model dir, or tiny",
                    group="Model")
    what: str = opt("policy", "policy, or discriminator (align checkpoints)", group="Model")
    dtype: str = opt("bf16", "weights dtype of the export: bf16, fp16 or fp32", group="Model")
    max_shard_size: str = opt("5GB", "largest safetensors shard", group="Output")
    eval: list[str] = opt(help="eval directories whose results go into the model card (repeatable; default: "
                               "eval-<name> beside the checkpoint when present)", group="Output", factory=list)
    verify: bool = opt(True, "reload the export and generate with it (policy: logits compared too)", group="Output")
    push_to_hub: str = opt("", "also upload the folder to this hub repo (token from $HF_TOKEN)", group="Hub")
    private: bool = opt(True, "create the hub repo private", group="Hub")

    def validate(self) -> None:
        if self.what not in WHATS:
            raise UsageError(f"--what must be policy or discriminator, not {self.what!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be bf16, fp16 or fp32, not {self.dtype!r}")
        if not self.ckpt:
            raise UsageError("--ckpt is required")
        if not self.out:
            raise UsageError("--out is required", hint="the Hugging Face folder to write")
