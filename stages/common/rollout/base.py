"""The rollout-engine interface: prompts (messages + images) x n samples -> completions with logprobs.

Every stage that samples from a policy (curate --select unsolved, hf teachers, align, rl, eval) goes
through an engine: `hf` everywhere, `vllm` where vLLM and a GPU exist (or vLLM's CPU build,
docs/vllm.md). Engines return token ids and the
sampled tokens' logprobs under the sampling distribution, so RL can use them as old logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0 = off
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)   # stop strings (the text is cut after the stop string)
    seed: int | None = None   # same seed + same inputs -> same samples


@dataclass
class RolloutPrompt:
    """One chat to continue: `messages` in the chat-template shape (content parts {"type": "image"} mark
    where images go, in order), and the decoded images."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)  # PIL.Image.Image


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]     # logprob of each sampled token under the sampling distribution
    finish_reason: str        # "stop" (EOS or a stop string) | "length"


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[RolloutPrompt], params: SamplingParams) -> list[list[Completion]]:
        """For each prompt, params.n completions (outer list follows `prompts`)."""

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (no-op for hf, reload for vllm)."""

    def sleep(self) -> None:
        """Release accelerator memory between rollouts (vllm); no-op for hf."""

    def wake(self) -> None:
        ...

    def close(self) -> None:
        """Release the engine before the stage tears its process groups down (vllm); no-op for hf."""
