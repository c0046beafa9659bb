"""RLConfig: `prism rl --algo grpo|dapo|gspo`. Defaults follow the paper's RLVR stage (docs/method.md);
knobs left as None take the chosen algorithm's default (stages.rl.algorithms)."""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.contract.config import CommonConfig, HardwareConfig, opt
from stages.common.contract.errors import UsageError
from stages.common.evaluation.options import HeldOutEvalConfig, check_eval_options
from stages.common.plan.report import check_plan_options
from stages.common.rollout import OVERLAP_HELP, check_overlap
from stages.rl.algorithms import ALGORITHMS


@dataclass
class RLConfig(HeldOutEvalConfig, HardwareConfig, CommonConfig):
    algo: str = opt("dapo", f"one of {', '.join(ALGORITHMS.names())}", group="Algorithm")
    ckpt: str = opt("", "policy to train: an sft/align/rl checkpoint, an HF dir or hub id, or tiny", group="Model")
    data: list[str] = opt(help="prompts with ground-truth answers (repeatable): synth, a curate dir, parquet...",
                          group="Data", factory=lambda: ["synth"])

    steps: int = opt(60, "optimizer rollout steps (paper: 2K prompts at 32 per step)", group="Rollout")
    prompts_per_step: int = opt(32, "prompts per rollout batch", group="Rollout")
    rollouts_per_prompt: int = opt(16, "samples per prompt (the group size n)", group="Rollout")
    max_new_tokens: int = opt(8192, "max response tokens", group="Rollout")
    max_prompt_chars: int = opt(16000, "drop (and count) questions longer than this many characters; 0: no limit",
                                group="Rollout", cli=False)
    temperature: float = opt(1.0, "sampling temperature", group="Rollout")
    top_p: float = opt(1.0, "nucleus sampling", group="Rollout")
    engine: str = opt("auto", "rollout engine: auto (vllm when installed on a GPU, else hf), hf, vllm", group="Rollout")
    overlap: int = opt(0, OVERLAP_HELP, group="Rollout")

    lr: float = opt(1e-6, "learning rate", group="Optimization")
    warmup: float = opt(10, "lr warmup: steps if >= 1, else a ratio of steps", group="Optimization")
    weight_decay: float = opt(0.01, "AdamW weight decay", group="Optimization")
    max_grad_norm: float = opt(1.0, "gradient clipping norm", group="Optimization")
    ppo_epochs: int = opt(1, "passes over each rollout batch", group="Optimization")
    mini_batches: int = opt(1, "optimizer updates per pass over a rollout batch", group="Optimization")
    micro_batch_tokens: int = opt(16384, "token budget of one forward/backward micro-batch", group="Optimization")

    clip_low: float | None = opt(None, "PPO clip below 1 (default by algo: 0.2 / gspo 3e-4)", group="Algorithm")
    clip_high: float | None = opt(None, "PPO clip above 1 (grpo 0.2, dapo 0.28, gspo 4e-4)", group="Algorithm")
    loss_agg: str | None = opt(None, "token-mean, seq-mean-token-mean, seq-mean-token-sum", group="Algorithm")
    normalize_std: bool = opt(True, "divide advantages by the group std", group="Algorithm")
    kl_coef: float = opt(0.0, "KL penalty to the frozen initial policy (0: off, no reference loaded)",
                         group="Algorithm")
    kl_kind: str = opt("k3", "KL estimator: k1 or k3 (low-variance)", group="Algorithm")
    dynamic_sampling: bool | None = opt(None, "drop groups whose accuracy is all equal (dapo default on)",
                                        group="Algorithm")
    max_num_gen_batches: int = opt(10, "rollout batches drawn at most to fill one step (dynamic sampling)",
                                   group="Algorithm")
    overlong_buffer: int | None = opt(None, "DAPO overlong buffer in tokens (0: off; capped at max_new_tokens)",
                                      group="Algorithm")
    overlong_penalty: float = opt(1.0, "DAPO overlong penalty factor", group="Algorithm")
    tis_cap: float = opt(0.0, "truncated importance sampling: weight each token by min(pi_trainer / pi_rollout, "
                              "cap) to correct the rollout engine's mismatch (0: off; e.g. 2)", group="Algorithm")
    reward: str = opt("protocol", "the reward: protocol (acc_weight * acc + format_weight * format), or your own "
                                  "verifier as module:function, fn(response, sample) -> float | dict (on PYTHONPATH; "
                                  "docs/extending.md)", group="Algorithm")
    acc_weight: float = opt(0.8, "--reward protocol: reward = acc_weight * acc + format_weight * format",
                            group="Algorithm")
    format_weight: float = opt(0.2, "see acc_weight", group="Algorithm")


    save_every: int = opt(10, "save resumable state every N steps", group="Logging")
    report_to: str = opt("none", "trackers through accelerate: none, tensorboard, wandb", group="Logging")
    keep_state: bool = opt(False, "keep optimizer state in the final checkpoint", group="Output", cli=False)

    eval_every: int = opt(10, "with --eval-tasks: evaluate every N steps, at the start and at the end",
                          group="Evaluation")

    def resolved(self, key: str):
        value = getattr(self, key)
        if value is not None:
            return value
        default = ALGORITHMS.get(self.algo).default(key)
        if key == "overlong_buffer" and default is not None and default >= self.max_new_tokens:
            # DAPO's 4096 assumes ~20K-token responses; against a short max_new_tokens keep its proportion
            # (a fifth) rather than a buffer that penalises from token 0
            return self.max_new_tokens // 5
        return default

    def validate(self) -> None:
        check_plan_options(self.gpu_memory, self.backend, self.world_size)
        check_eval_options(self)
        ALGORITHMS.get(self.algo)  # an unknown name fails here, listing the registered ones
        from stages.common.rewards.table import load_reward  # imports the user's module: only once asked for

        load_reward(self.reward)   # an unknown name, a missing module or function fails here, before any output
        if not self.ckpt:
            raise UsageError("--ckpt is required", hint="e.g. --ckpt out/sft or --ckpt tiny")
        if self.rollouts_per_prompt < 1 or self.prompts_per_step < 1 or self.steps < 1:
            raise UsageError("steps, prompts_per_step and rollouts_per_prompt must be positive")
        if self.rollouts_per_prompt < 2:
            raise UsageError(f"--algo {self.algo} needs at least 2 rollouts per prompt: advantages are relative to "
                             "the group, and a group of one has advantage 0 (nothing is learnt)",
                             hint="--rollouts-per-prompt 8 (the paper uses 16)")
        if self.overlong_buffer is not None and self.overlong_buffer >= self.max_new_tokens:
            raise UsageError(f"overlong_buffer {self.overlong_buffer} is not below max_new_tokens "
                             f"{self.max_new_tokens}: the length penalty would start at token "
                             f"{max(0, self.max_new_tokens - self.overlong_buffer)}",
                             hint="set overlong_buffer below max_new_tokens (DAPO: 4096 of 20480), or 0 for none")
        if self.overlong_buffer is not None and self.overlong_buffer < 0:
            raise UsageError("overlong_buffer must be >= 0")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be positive for RL sampling, not {self.temperature}")
        if self.resolved("loss_agg") not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            raise UsageError(f"unknown loss_agg {self.loss_agg!r}")
        if self.kl_kind not in ("k1", "k3"):
            raise UsageError(f"unknown kl_kind {self.kl_kind!r}", hint="use k1 or k3")
        if self.tis_cap < 0:
            raise UsageError("tis_cap must be >= 0 (0: off)")
        if self.tis_cap and not ALGORITHMS.get(self.algo).token_ratio:
            raise UsageError(f"tis_cap weights tokens; {self.algo}'s ratio is per sequence",
                             hint="use " + " or ".join(n for n, a in ALGORITHMS.items() if a.token_ratio))
        if self.overlap and not ALGORITHMS.get(self.algo).token_ratio:
            raise UsageError(f"--overlap 1 is corrected per token (--tis-cap); {self.algo}'s ratio is per sequence",
                             hint="use " + " or ".join(n for n, a in ALGORITHMS.items() if a.token_ratio)
                                  + ", or --overlap 0")
        check_overlap(self.overlap, self.tis_cap, self.engine)
        if self.prompts_per_step * self.rollouts_per_prompt % self.mini_batches:
            raise UsageError("prompts_per_step x rollouts_per_prompt must be divisible by mini_batches")
