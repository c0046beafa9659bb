"""AlignConfig: `prism align`. Defaults are the paper's alignment stage (docs/method.md)."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.config import CommonConfig, HardwareConfig, opt
from stages.common.contract.errors import UsageError
from stages.common.contract.registry import Registry
from stages.common.evaluation.options import HeldOutEvalConfig, check_eval_options
from stages.common.plan.report import check_plan_options
from stages.common.rollout import OVERLAP_HELP, check_overlap


@dataclass(frozen=True)
class AdvantageMode:
    about: str
    adjust: str   # in stages.align.advantage: (prism advantages, {"acc", "score"}, group ids) -> advantages
                  # (named, not held, so this table imports no torch: the CLI reads it to build its options)


ADVANTAGE_MODES: Registry[AdvantageMode] = Registry("advantage mode", "--advantage-mode")
ADVANTAGE_MODES.register("prism", AdvantageMode("the discriminator's advantages (the paper)", "discriminator_only"))
ADVANTAGE_MODES.register("acc-gated", AdvantageMode("a wrong answer's advantage is never positive",
                                                    "gated_by_accuracy"))
ADVANTAGE_MODES.register("rlvr-mixed", AdvantageMode("plus the group-normalised verifiable reward",
                                                     "mixed_with_rlvr"))


DISC_LAYOUTS = ("auto", "prefix", "shared", "separate")   # --disc-layout; stages.align.scoring runs all but auto


@dataclass
class AlignConfig(HeldOutEvalConfig, HardwareConfig, CommonConfig):
    ckpt: str = opt("", "policy to align: an sft checkpoint (or any policy spec)", group="Model")
    data: list[str] = opt(help="prompts with teacher demonstrations (repeatable): a curate dir, parquet, synth",
                          group="Data", factory=list)

    disc_base: str = opt("", "dense Qwen3-VL to upcycle into the MoE discriminator (paper: Qwen3-VL-2B-Instruct; "
                             "default: the policy's base)", group="Discriminator")
    disc: str = opt("", "reuse a discriminator: an align checkpoint or a discriminator/ directory",
                    group="Discriminator")
    disc_dense: bool = opt(False, "ablation: dense discriminator (no upcycling)", group="Discriminator")
    disc_text_only: bool = opt(False, "ablation: the discriminator never sees the images", group="Discriminator")
    num_experts: int = opt(4, "experts per MoE layer", group="Discriminator")
    top_k: int = opt(2, "experts routed per token", group="Discriminator")
    expert_noise: float = opt(0.01, "std of the Gaussian noise added to each expert copy", group="Discriminator",
                              cli=False)
    router_std: float = opt(0.02, "std of the router initialisation", group="Discriminator", cli=False)
    aux_loss_coef: float = opt(0.01, "router load-balancing loss coefficient", group="Discriminator", cli=False)
    disc_lr: float = opt(1e-6, "discriminator learning rate in the game", group="Discriminator")
    disc_layout: str = opt("auto", "scoring layout: prefix (each prompt once as a KV cache, segments packed in "
                                   "narrow rows on top), shared (prompt once per group, one row with a block mask), "
                                   "separate; auto: prefix unless the discriminator is checkpointed, then shared",
                           group="Discriminator")
    score_clip: float = opt(10.0, "discriminator scores are clipped to [-clip, clip] in its loss",
                            group="Discriminator", cli=False)
    score_reg: float = opt(0.001, "L2 regularisation of the scores", group="Discriminator", cli=False)

    warmup_steps: int = opt(100, "Bradley-Terry warmup steps of the discriminator (0: skip)", group="Warmup")
    warmup_pairs: str = opt("", "warmup pairs file (jsonl/parquet: prompt, image, teacher_caption, teacher_cot, "
                                "student_caption, student_cot); default: sample the policy on the data",
                            group="Warmup")
    warmup_prompts: int = opt(512, "prompts sampled from the policy for warmup pairs", group="Warmup")
    warmup_batch: int = opt(16, "pairs per warmup step", group="Warmup")
    warmup_lr: float = opt(1e-5, "warmup learning rate (cosine, warmup ratio 0.1)", group="Warmup")
    warmup_holdout: float = opt(0.1, "held-out fraction of pairs for pairwise accuracy", group="Warmup")

    steps: int = opt(500, "alignment steps", group="Game")
    prompts_per_step: int = opt(4, "prompts per step", group="Game")
    rollouts_per_prompt: int = opt(16, "rollouts per prompt (the group size n)", group="Game")
    max_new_tokens: int = opt(6144, "max response tokens", group="Game")
    temperature: float = opt(1.0, "sampling temperature", group="Game")
    lr: float = opt(1e-6, "policy learning rate (constant)", group="Game")
    weight_decay: float = opt(0.01, "AdamW weight decay (policy and discriminator)", group="Game")
    alpha: float = opt(0.5, "weight of perception (caption) vs reasoning (think) in the advantage", group="Game")
    format_penalty: float = opt(1.5, "advantage penalty of a format-invalid response", group="Game")
    advantage_mode: str = opt("prism", f"one of {', '.join(ADVANTAGE_MODES.names())}", group="Game")
    acc_weight: float = opt(0.8, "rlvr-mixed: verifiable reward = acc_weight * acc + format_weight * format",
                            group="Game", cli=False)
    format_weight: float = opt(0.2, "see acc_weight", group="Game", cli=False)
    clip_low: float = opt(0.2, "PPO clip below 1", group="Game", cli=False)
    clip_high: float = opt(0.2, "PPO clip above 1", group="Game", cli=False)
    loss_agg: str = opt("token-mean", "policy loss aggregation", group="Game", cli=False)
    max_grad_norm: float = opt(1.0, "gradient clipping (both models)", group="Game", cli=False)
    micro_batch_tokens: int = opt(16384, "token budget of a policy micro-batch", group="Game", cli=False)
    engine: str = opt("auto", "rollout engine: auto, hf, vllm", group="Game")
    overlap: int = opt(0, OVERLAP_HELP, group="Game")
    tis_cap: float = opt(0.0, "truncated importance sampling: weight each token by min(pi_trainer / pi_rollout, cap) "
                              "(0: off; e.g. 2; --overlap 1 needs it)", group="Game")

    disc_row_tokens: int = opt(8192, "token budget of one discriminator scoring row (a group is split into rows "
                                     "of at most this many tokens, each repeating the prompt)", group="Discriminator")
    disc_gradient_checkpointing: str | bool = opt(
        "auto", "recompute the discriminator's activations in backward: on, off, or auto (on only where the memory "
                "plan needs it on this device)", group="Discriminator", flag="--disc-grad-checkpointing")

    save_every: int = opt(25, "save resumable state every N steps", group="Logging")
    report_to: str = opt("none", "trackers through accelerate: none, tensorboard, wandb", group="Logging")
    keep_state: bool = opt(False, "keep optimizer state in the final checkpoint", group="Output", cli=False)

    eval_every: int = opt(25, "with --eval-tasks: evaluate every N steps, at the start and at the end",
                          group="Evaluation")

    def validate(self) -> None:
        check_plan_options(self.gpu_memory, self.backend, self.world_size)
        check_eval_options(self)
        if self.disc_row_tokens < 1:
            raise UsageError("disc_row_tokens must be >= 1")
        if not self.ckpt:
            raise UsageError("--ckpt is required", hint="the SFT checkpoint to align, e.g. --ckpt out/sft")
        if not self.data:
            raise UsageError("--data is required", hint="curated prompts with teacher demonstrations")
        ADVANTAGE_MODES.get(self.advantage_mode)  # an unknown name fails here, listing the registered ones
        if isinstance(self.disc_gradient_checkpointing, bool):  # YAML reads an unquoted on/off as a boolean
            self.disc_gradient_checkpointing = "on" if self.disc_gradient_checkpointing else "off"
        if self.disc_gradient_checkpointing not in ("auto", "on", "off"):
            raise UsageError(f"unknown disc_gradient_checkpointing {self.disc_gradient_checkpointing!r}",
                             hint="use auto, on or off")
        if self.disc_layout not in DISC_LAYOUTS:
            raise UsageError(f"unknown disc_layout {self.disc_layout!r}", hint=", ".join(DISC_LAYOUTS))
        if self.disc_layout == "prefix" and self.disc_gradient_checkpointing == "on":
            raise UsageError("--disc-layout prefix cannot run with --disc-grad-checkpointing on",
                             hint="checkpointing drops the prompt's KV cache the prefix layout reads; use "
                                  "--disc-layout shared, or checkpointing off")
        if not 1 <= self.top_k <= self.num_experts:
            raise UsageError(f"top_k {self.top_k} must be between 1 and num_experts ({self.num_experts})")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError("alpha must be in [0, 1]")
        if self.steps < 0 or self.prompts_per_step < 1 or self.rollouts_per_prompt < 1:
            raise UsageError("steps must be >= 0, prompts_per_step and rollouts_per_prompt >= 1")
        if self.tis_cap < 0:
            raise UsageError("tis_cap must be >= 0 (0: off)")
        check_overlap(self.overlap, self.tis_cap, self.engine)
        if self.disc and (self.disc_base or self.disc_dense):
            raise UsageError("--disc reuses a discriminator; it cannot be combined with --disc-base/--disc-dense")
