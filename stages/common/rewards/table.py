"""The rewards a stage can score rollouts with (`prism rl --reward NAME|module:function`), one table.

A reward is a function `reward(response: str, sample: Sample) -> float | dict`:
  response  the policy's full completion text (any string: a reward must not raise on garbage);
  sample    the prompt's Sample (stages/common/contract/samples.py): .answer, .choices, .question, .meta ...;
  returns   a number (the reward), or a dict with "score" (the reward) and optionally "acc" and "format"
            (numbers in [0, 1]: the metrics acc/mean and format/mean, and the signal DAPO's dynamic sampling
            reads). Without "acc", acc is the score; without "format", format is whether the response
            follows the protocol (stages/common/protocol.py).

Built in: "protocol", the paper's verifiable reward (compute_score: acc_weight * acc + format_weight * format).
A user's own verifier is named `module:function` and imported from PYTHONPATH (as trl's reward functions
are plain callables); every failure to find or call it is one UsageError line. docs/extending.md, "Add a
reward".
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.registry import Registry
from stages.common.protocol import format_response, parse_response
from stages.common.rewards import ACC_WEIGHT, FORMAT_WEIGHT, compute_score

RewardFn = Callable[..., Any]   # (response: str, sample: Sample) -> float | dict


@dataclass(frozen=True)
class Reward:
    about: str
    make: Callable[..., RewardFn]   # (acc_weight, format_weight) -> the reward function


def protocol_reward(acc_weight: float = ACC_WEIGHT, format_weight: float = FORMAT_WEIGHT) -> RewardFn:
    def reward(response: str, sample) -> dict:
        return compute_score(response, sample.answer, sample.choices, acc_weight=acc_weight,
                             format_weight=format_weight)
    return reward


REWARDS: Registry[Reward] = Registry("reward", "--reward")
REWARDS.register("protocol", Reward("0.8 acc + 0.2 format: the <answer> matches the ground truth, the response "
                                    "follows the caption/think/answer protocol", protocol_reward))


@dataclass(frozen=True)
class LoadedReward:
    """A reward ready to score: its spec (recorded in the manifest) and its function."""
    name: str
    fn: RewardFn

    def __call__(self, response: str, sample) -> dict:
        """{"score", "acc", "format"} as floats; a wrong return type is a UsageError naming the reward, and a
        reward that raises stops the run naming the sample (never a silent 0)."""
        try:
            result = self.fn(response, sample)
        except Exception as e:
            raise PrismError(f"--reward {self.name} raised {type(e).__name__} on sample {sample.id!r}: {e}") from e
        return normalise(self.name, result, response)


def load_reward(spec: str, acc_weight: float = ACC_WEIGHT, format_weight: float = FORMAT_WEIGHT) -> LoadedReward:
    """A registered reward by name, or a user's `module:function`; acc/format weights apply to "protocol"."""
    spec = (spec or "").strip()
    if ":" not in spec:
        return LoadedReward(spec, REWARDS.get(spec).make(acc_weight, format_weight))
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise UsageError(f"--reward {spec!r} is not module:function",
                         hint=f"e.g. --reward my_rewards:exact_match, or one of {', '.join(REWARDS.names())}")
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UsageError(f"--reward {spec}: no module {module_name!r} on the Python path",
                             hint="put its folder on PYTHONPATH") from None
        raise UsageError(f"--reward {spec}: importing {module_name} failed: {e}") from None
    except Exception as e:  # the user's module fails on import: say so in one line, not a traceback
        raise UsageError(f"--reward {spec}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    fn = target
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UsageError(f"--reward {spec}: module {module_name} has no {attr!r}")
    if not callable(fn):
        raise UsageError(f"--reward {spec}: {attr} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("response", object())
    except TypeError:
        raise UsageError(f"--reward {spec}: {attr}{inspect.signature(fn)} cannot be called as "
                         "fn(response, sample)") from None
    except ValueError:   # builtins without a signature: the probe call decides
        pass
    return LoadedReward(spec, fn)


def normalise(name: str, result: Any, response: str) -> dict:
    if isinstance(result, dict):
        if "score" not in result:
            raise UsageError(f"--reward {name} returned a dict without 'score' (keys: {', '.join(map(str, result))})")
        score = _number(name, "score", result["score"])
        acc = _number(name, "acc", result["acc"]) if "acc" in result else score
        fmt = _number(name, "format", result["format"]) if "format" in result else _protocol_format(response)
        return {**result, "score": score, "acc": acc, "format": fmt}
    score = _number(name, "the reward", result)
    return {"score": score, "acc": score, "format": _protocol_format(response)}


def _number(name: str, what: str, value: Any) -> float:
    if isinstance(value, (int, float)) and math.isfinite(value):   # bool too: a verifier's True is 1.0
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:   # a numpy or torch scalar
        return _number(name, what, value.item())
    raise UsageError(f"--reward {name} returned {what} {value!r} ({type(value).__name__}); "
                     "expected a finite number or a dict with 'score'")


def _protocol_format(response: str) -> float:
    return 1.0 if parse_response(response).format_ok else 0.0


def probe(reward: LoadedReward, sample) -> dict:
    """Call the reward once on a well-formed response to `sample`, before any output is written: a reward
    that raises or returns the wrong type fails here as one line, not at step 1 of a launched run."""
    response = format_response("A probe caption.", "A probe reasoning.", sample.answer or "probe")
    try:
        return reward(response, sample)
    except UsageError:
        raise
    except PrismError as e:   # any response may come out of a policy: a reward that raises is a broken reward
        raise UsageError(e.message + " (a well-formed probe response, before the run)",
                         hint="a reward must return a number (or a dict with 'score') for any response") from None
