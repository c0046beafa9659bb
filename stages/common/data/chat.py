"""How a Sample becomes a chat: the one place that decides what the model sees for a problem.

Every stage that prompts a policy (sft targets, curate teachers/students, align, rl, eval) builds its
messages here, so training and evaluation prompts never drift apart.
"""

from __future__ import annotations

import re

from stages.common.contract.errors import PrismError
from stages.common.contract.samples import Sample
from stages.common.protocol import SYSTEM_PROMPT, format_response
from stages.common.rollout.base import RolloutPrompt
from stages.common.rollout.prompts import screen, stand_in

_HAS_OPTIONS = re.compile(r"(^|\n)\s*\(?A[.):]\s", re.M)


def question_text(sample: Sample) -> str:
    """The question, with lettered options appended when the sample has choices the text does not list."""
    q = sample.question.strip()
    if sample.choices and not _HAS_OPTIONS.search(q):
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        q += "\n" + "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(sample.choices[:26]))
    return q


def problem_messages(sample: Sample, system_prompt: bool = True, images=None) -> list[dict]:
    """[system?, user(images..., question)]. `images` (PIL) are embedded in the parts when given, which is
    what processor.apply_chat_template needs to tokenize; rollout engines take them separately."""
    parts = []
    for i in range(len(sample.images)):
        part = {"type": "image"}
        if images is not None:
            part["image"] = images[i]
        parts.append(part)
    parts.append({"type": "text", "text": question_text(sample)})
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system_prompt else []
    messages.append({"role": "user", "content": parts})
    return messages


def rollout_prompt(sample: Sample, system_prompt: bool = True) -> RolloutPrompt:
    return RolloutPrompt(messages=problem_messages(sample, system_prompt), images=sample.pil_images())


def demonstration_text(sample: Sample) -> str | None:
    """The protocol response a teacher wrote for this sample (None if it has no teacher)."""
    t = sample.teacher
    if t is None:
        return None
    return format_response(t.caption, t.think, t.answer)


def conversation_messages(sample: Sample, images=None) -> list[dict]:
    """A ShareGPT-style conversation with "<image>" placeholders as chat-template messages."""
    messages, used = [], 0
    for turn in sample.conversation or []:
        role, content = turn["role"], turn["content"]
        if role == "user" and "<image>" in content:
            parts = []
            pieces = content.split("<image>")
            for j, piece in enumerate(pieces):
                if piece.strip():
                    parts.append({"type": "text", "text": piece})
                if j < len(pieces) - 1:
                    part = {"type": "image"}
                    if images is not None:
                        part["image"] = images[used]
                    parts.append(part)
                    used += 1
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": content})
    return messages


def sft_messages(sample: Sample, system_prompt: bool = True, images=None) -> list[dict] | None:
    """The full training chat for a sample: a conversation as given, or problem + teacher demonstration.
    None when the sample has nothing to learn from (no teacher, no conversation)."""
    if sample.conversation:
        return conversation_messages(sample, images)
    target = demonstration_text(sample)
    if target is None:
        return None
    return problem_messages(sample, system_prompt, images) + [{"role": "assistant", "content": target}]


def screened_rollout_prompts(samples: list[Sample], processor, system_prompt: bool = True
                             ) -> tuple[list[RolloutPrompt], dict[int, str]]:
    """rollout_prompt for each sample, with a stand-in (rollout.prompts.screen) where an image does not decode
    or the processor refuses it, and {index: "sample <id>: reason"} for those: one bad row costs its own
    rollouts, never the run, and every process keeps the batch's shape."""
    prompts, undecodable = [], {}
    for i, sample in enumerate(samples):
        try:
            prompts.append(rollout_prompt(sample, system_prompt))
        except PrismError as e:   # an image that passed the header checks at load but does not decode
            undecodable[i] = e.message
            prompts.append(stand_in(RolloutPrompt(problem_messages(sample, system_prompt)), len(sample.images)))
    prompts, refused = screen(processor, prompts, undecodable)
    return prompts, {i: (reason if i in undecodable else f"sample {samples[i].id}: {reason}")
                     for i, reason in refused.items()}
