"""The prism model for lmms-eval: `--model prism --model_args pretrained=CKPT,engine=hf`.

Registered through the `lmms_eval.models` entry point (pyproject.toml -> `manifest`). It generates with the
project's rollout engine (hf everywhere, vllm on GPUs) under the protocol system prompt, greedily unless a
task asks for sampling, and replies to lmms-eval with:
  - the full protocol response for the prism_* tasks (their scorers read caption, think and answer), and
  - the content of <answer> for every other task (the whole text when there is none), so official scorers
    and judges see the final answer only.
Every full response is also kept in `responses[(task, doc_id)]` for prism eval's per-sample files.

`manifest()` only builds the registration record; the class imports lmms-eval's base class, which exists
only where lmms-eval is installed (the `eval` extra).
"""

from __future__ import annotations

from itertools import groupby

from stages.common.contract import console
from stages.common.contract.errors import PrismError, UsageError
from stages.common.models.loading import load_policy, load_processor
from stages.common.protocol import SYSTEM_PROMPT, parse_response
from stages.common.rollout import RolloutPrompt, SamplingParams, make_engine
from stages.common.rollout.prompts import screen

MODEL_ID = "prism"
REPLY_MODES = ("auto", "full", "answer")
DEFAULT_MAX_NEW_TOKENS = 4096

try:  # the base class exists only with the eval extra; prism eval checks for it before importing this
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - exercised where lmms-eval is absent
    _LmmsBase = object


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="stages.eval.lmms_plugin.PrismLMM")


def wants_full_response(task: str, mode: str = "auto") -> bool:
    if mode == "auto":
        return str(task).startswith("prism_")
    return mode == "full"


def reply_text(response: str, task: str, mode: str = "auto") -> str:
    """What lmms-eval receives for one response."""
    if wants_full_response(task, mode):
        return response

    answer = parse_response(response).answer
    return answer if answer is not None else response


def sampling_for(gen_kwargs: dict, cap: int, seed: int | None = None):
    """SamplingParams from a task's generation_kwargs: greedy unless it samples; max_new_tokens capped.

    Stop strings (`until`) are not passed on: they were written for other models' prompts ("Q:"), while a
    protocol response ends at the chat template's end-of-turn token.
    """
    gen_kwargs = dict(gen_kwargs or {})
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    wanted = int(gen_kwargs.get("max_new_tokens", cap) or cap)
    return SamplingParams(n=1, temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
                          max_new_tokens=max(1, min(wanted, cap)), seed=seed)


def as_images(visuals) -> list:
    """PIL images from what a task's doc_to_visual returned (images or image paths)."""
    from PIL import Image


    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = []
    for v in visuals:
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, str) and v.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")):
            images.append(Image.open(v).convert("RGB"))
        else:
            raise PrismError(f"the prism model reads images only, got {type(v).__name__} {str(v)[:60]!r}",
                             hint="video and audio tasks are not supported")
    return images


def protocol_prompt(context: str, images: list, system_prompt: bool = True):
    """A RolloutPrompt: [system protocol prompt], user(images..., task text)."""
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": str(context)}]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system_prompt else []
    messages.append({"role": "user", "content": parts})
    return RolloutPrompt(messages=messages, images=list(images))


def _flag(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


class PrismLMM(_LmmsBase):
    """A prism checkpoint (or an already loaded model + engine, as prism eval passes) for lmms-eval."""

    is_simple = True

    def __init__(self, pretrained: str = "tiny", engine: str = "auto", dtype: str = "auto",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int | str | None = 8,
                 reply: str = "auto", system_prompt: bool | str = True, seed: int = 0,
                 rollout_engine=None, **ignored) -> None:
        super().__init__()

        if reply not in REPLY_MODES:
            raise UsageError(f"prism model: reply={reply!r} is not one of {', '.join(REPLY_MODES)}")
        if rollout_engine is None:
            processor = load_processor(pretrained)
            model = load_policy(pretrained, dtype=dtype, train=False)
            rollout_engine = make_engine(engine, model, processor, max_new_tokens=max_new_tokens, seed=seed)
        self.engine = rollout_engine
        self.pretrained = pretrained
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = max(1, int(batch_size)) if str(batch_size or "").isdigit() else 8
        self.reply = reply
        self.system_prompt = _flag(system_prompt) if isinstance(system_prompt, str) else bool(system_prompt)
        self.seed = int(seed)
        self.responses: dict[tuple[str, int], str] = {}
        self.refused: dict[tuple[str, int], str] = {}   # docs whose image the processor refuses: answered ""

    def generate_until(self, requests) -> list[str]:
        replies: list[str | None] = [None] * len(requests)
        jobs = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = as_images(doc_to_visual(self.task_dict[task][split][doc_id]))
            jobs.append((index, task, doc_id, protocol_prompt(context, images, self.system_prompt),
                         sampling_for(gen_kwargs, self.max_new_tokens, self.seed)))

        # One engine call per run of requests that share sampling parameters, batch_size prompts at a time.
        def same_params(job):
            return repr(job[4])

        for _, group in groupby(sorted(jobs, key=same_params), key=same_params):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                batch = group[start:start + self.batch_size]
                prompts, refused = screen(self.engine.processor, [job[3] for job in batch])
                outputs = self.engine.generate(prompts, batch[0][4])
                for i, ((index, task, doc_id, _, _), completions) in enumerate(zip(batch, outputs)):
                    response = "" if i in refused else completions[0].text
                    if i in refused:
                        console.warn(f"eval: the processor refuses {task} doc {doc_id}, scored as unanswered "
                                     f"({refused[i]})")
                        self.refused[(task, doc_id)] = refused[i]
                    self.responses[(task, doc_id)] = response
                    replies[index] = reply_text(response, task, self.reply)
        return replies

    def loglikelihood(self, requests):
        raise NotImplementedError("the prism model generates only; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the prism model does not support multi-round tasks")
