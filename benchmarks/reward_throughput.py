"""Reward throughput: compute_score responses per second on one core, against a 2,000/s target.

A deterministic mix shaped like RLVR rollouts: prompts of several answer types, 8 rollouts each
(correct and wrong answers in varied spellings, malformed responses, a few symbolic answers only
math-verify can settle), every response with a realistic caption and think. Each timed repetition
starts with cold caches (ours and math-verify's), so only the ground-truth reuse within a group of
rollouts is cached, as in training. The figure is the median of the repetitions.

    python benchmarks/reward_throughput.py [--repeats 5] [--prompts 250]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common import rewards  # noqa: E402
from stages.common.protocol import format_response  # noqa: E402

TARGET_PER_S = 2000
ROLLOUTS_PER_PROMPT = 8
RESULT_PATH = ROOT / "benchmarks" / "results" / "reward_throughput.json"

_OBJECTS = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon", "bar chart",
            "label 'A'", "axis with ticks 0-10", "gray background", "orange pentagon"]


def _caption(rng: random.Random) -> str:
    return "\n".join(f"- {rng.choice(['Flat', 'Plain', 'Simple'])} style: a {obj} near the "
                     f"{rng.choice(['left', 'right', 'top', 'centre'])}" for obj in rng.sample(_OBJECTS, 4))


def _think(rng: random.Random) -> str:
    steps = [f"Step {i + 1}: look at the {rng.choice(_OBJECTS)} and count {rng.randint(1, 9)} of them; "
             f"compare with the {rng.choice(_OBJECTS)}." for i in range(rng.randint(4, 10))]
    return " ".join(steps) + " So the answer follows."


def _malformed(rng: random.Random, caption: str, think: str, answer: str) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"  # caption missing
    if kind == 1:
        return f"<caption>\n{caption}\n</caption>\n<think>\n{think[: len(think) // 2]}"  # truncated
    if kind == 2:
        return f"Sure! {format_response(caption, think, answer)} Hope this helps."  # chatter around it
    return f"<answer>{answer}</answer>\n<think>\n{think}\n</think>\n<caption>\n{caption}\n</caption>"  # order


def _prompt(rng: random.Random, kind: str):
    """(ground truth, choices, [answers a policy might give])."""
    if kind == "mc":
        options = [str(rng.randint(2, 60)) for _ in range(4)]
        letter = rng.choice("ABCD")
        right = options["ABCD".index(letter)]
        wrong = rng.choice([c for c in "ABCD" if c != letter])
        return letter, options, [letter, f"({letter})", f"{letter}.", f"Answer: {letter}", f"{letter}. {right}",
                                 right, wrong, f"({wrong})"]
    if kind == "integer":
        n = rng.randint(2, 2000)
        return str(n), None, [str(n), f"{n:,}", f"{n} objects", f"\\boxed{{{n}}}", str(n + 1), str(n - 1),
                              f"{n}.0", "x"]
    if kind == "fraction":
        a, b = rng.randint(1, 9), rng.randint(10, 19)
        return f"\\frac{{{a}}}{{{b}}}", None, [f"{a}/{b}", f"\\dfrac{{{a}}}{{{b}}}", f"{a / b:.4f}",
                                               f"{a / b:.2f}", f"{a + 1}/{b}", f"{a / b * 1.1:.3f}",
                                               f"$\\frac{{{a}}}{{{b}}}$", f"{a}/{b + 1}"]
    if kind == "percent":
        p = rng.randint(1, 99)
        return f"{p}%", None, [f"{p}%", f"{p}", f"{p / 100}", f"{p}\\%", f"{p + 5}%", f"{p / 10}",
                               f"{p} percent", f"{p - 1}"]
    if kind == "closed_form":
        k = rng.choice([2, 3, 5, 6, 7])
        return f"\\frac{{\\sqrt{{{k}}}}}{{2}}", None, [f"\\frac{{\\sqrt{{{k}}}}}{{2}}", f"\\sqrt{{{k}}}/2",
                                                      f"{(k ** 0.5) / 2:.4f}", f"\\frac{{{k}}}{{2}}",
                                                      f"\\sqrt{{{k}}}", f"\\frac{{1}}{{2}}\\sqrt{{{k}}}",
                                                      f"{k}\\sqrt{{2}}", "\\frac{\\pi}{3}"]
    if kind == "multi":
        a, b = rng.sample(range(1, 30), 2)
        return f"{a}, {b}", None, [f"{a}, {b}", f"{b}, {a}", f"{a},{b}", f"{a}, {b + 1}", f"{a}", f"({a}, {b})",
                                   f"{a} and {b}", f"{b}; {a}"]
    if kind == "text":
        word = rng.choice(["red", "blue", "left", "yes", "no", "triangle"])
        return word, None, [word, word.capitalize(), f"{word}.", f"\\text{{{word}}}", "green", "Right", "maybe",
                            f"It is {word}"]
    # symbolic: only math-verify can tell these apart; a small share of real rollouts
    c = rng.randint(1, 5)
    expanded = f"x^2+{2 * c}x+{c * c}"
    return expanded, None, [f"(x+{c})^2", expanded, f"(x+{c + 1})^2", expanded, f"x^2 + {2 * c}x + {c * c}",
                            expanded, expanded, expanded]


_KIND_WEIGHTS = {"mc": 30, "integer": 25, "fraction": 12, "percent": 6, "closed_form": 10, "multi": 6, "text": 8,
                 "symbolic": 3}


def build_mix(n_prompts: int, seed: int = 0):
    rng = random.Random(seed)
    kinds = list(_KIND_WEIGHTS)
    weights = [_KIND_WEIGHTS[k] for k in kinds]
    items, counts = [], collections.Counter()
    for _ in range(n_prompts):
        kind = rng.choices(kinds, weights)[0]
        truth, choices, answers = _prompt(rng, kind)
        for answer in answers[:ROLLOUTS_PER_PROMPT]:
            caption, think = _caption(rng), _think(rng)
            if rng.random() < 0.15:
                items.append((_malformed(rng, caption, think, answer), truth, choices))
                counts["malformed"] += 1
            else:
                items.append((format_response(caption, think, answer), truth, choices))
            counts[kind] += 1
    return items, counts


def _clear_caches() -> None:
    rewards.prepare_target.cache_clear()
    rewards.prepare_choices.cache_clear()
    try:
        from math_verify import parser

        for name in ("parse_latex_cached", "parse_expr_cached"):
            getattr(getattr(parser, name, None), "cache_clear", lambda: None)()
    except ImportError:
        pass


def measure(items, repeats: int) -> tuple[float, list[float], dict]:
    for response, truth, choices in items:  # warm-up: imports (math-verify, sympy), regex compilation
        rewards.compute_score(response, truth, choices)
    rates, outcome = [], collections.Counter()
    for _ in range(repeats):
        _clear_caches()
        start = time.perf_counter()
        for response, truth, choices in items:
            result = rewards.compute_score(response, truth, choices)
        elapsed = time.perf_counter() - start
        rates.append(len(items) / elapsed)
    for response, truth, choices in items:
        result = rewards.compute_score(response, truth, choices)
        outcome["acc_1"] += result["acc"] == 1.0
        outcome["format_ok"] += result["format"] == 1.0
    return statistics.median(rates), rates, dict(outcome)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=250)
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(1)  # not used by rewards; keeps an accidental import from taking cores
    except ImportError:
        pass
    items, counts = build_mix(args.prompts)
    rate, rates, outcome = measure(items, args.repeats)
    result = {
        "responses_per_s": round(rate, 1),
        "target": TARGET_PER_S,
        "ratio_vs_target": round(rate / TARGET_PER_S, 3),
        "repetitions_per_s": [round(r, 1) for r in rates],
        "responses": len(items),
        "mix": dict(counts),
        "outcome": outcome,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "note": "shared machine, single thread; other jobs may be running"},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULT_PATH.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
