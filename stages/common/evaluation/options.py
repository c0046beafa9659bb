"""The pure parts of evaluation during training: the options (--eval-tasks, --eval-every, --eval-n, --keep), when
it runs, how its problems split over ranks, and which evaluation is the best. No torch: every stage's config
imports this, and the CLI starts without torch.
"""

from __future__ import annotations

import dataclasses

from stages.common.contract.config import opt
from stages.common.contract.errors import UsageError
from stages.common.world.synth.benchmark import parse_spec

# The tasks a training stage can evaluate on as it runs. synth's problems come from its test split, which owns
# its own slice of the scene space: never a training problem (stages.common.world.synth).
TRAINING_EVAL_TASKS = ("synth",)
# What an evaluation of synth reports, each higher-is-better (what --keep best:synth/METRIC may name).
SYNTH_METRICS = ("acc", "format", "caption_f1", "caption_precision", "caption_recall")
METRIC_PREFIX = "eval/"
KEEP_BEST = "best:"
# The plot panel of the held-out curves, drawn beside each training stage's own (align: beside the drift gaps, which
# say the game is played; this says whether it helps).
HELD_OUT_PANEL = {"held-out synth (greedy)": {"eval/synth/acc": "accuracy", "eval/synth/caption_f1": "caption F1"}}


@dataclasses.dataclass
class HeldOutEvalConfig:
    """The held-out evaluation section every training stage offers (align, rl, sft), defined once so the stages
    cannot drift apart. Stage configs inherit it first (`class RLConfig(HeldOutEvalConfig, HardwareConfig,
    CommonConfig)`); `eval_every` stays in each stage, whose default pace differs (sft's also paces its eval loss),
    and sft, which has no --max-new-tokens, sets its own eval_max_new_tokens."""

    eval_tasks: list[str] = opt(help="evaluate greedily on held-out problems as the run trains: synth (its test split, "
                                     "never a training problem; docs/eval-during-training.md); empty: no evaluation",
                                group="Evaluation", factory=list)
    eval_n: int = opt(64, "held-out problems per evaluation (the first N of eval_synth, drawn with seed 0)",
                      group="Evaluation")
    eval_synth: str = opt("synth:test:200", "the synth test split the held-out problems come from", group="Evaluation",
                          cli=False)
    eval_max_new_tokens: int = opt(0, "max response tokens of an evaluation (0: --max-new-tokens)", group="Evaluation")
    eval_batch_size: int = opt(16, "prompts per generate call of an evaluation", group="Evaluation", cli=False)
    keep: str = opt("", "best:synth/METRIC (acc, caption_f1, format...): also keep the weights of the best evaluation "
                        "in OUT/best; the next stage takes them as --ckpt OUT#best", group="Output")


def metric_keys(task: str) -> list[str]:
    """The metrics.jsonl keys an evaluation of one task writes: eval/synth/acc, eval/synth/caption_f1, ..."""
    return [f"{METRIC_PREFIX}{task}/{m}" for m in SYNTH_METRICS]


def parse_keep(keep: str) -> str | None:
    """--keep best:TASK/METRIC -> the metrics.jsonl key it ranks by (eval/TASK/METRIC); "" -> None (the final
    weights only). A metric no evaluation writes is refused here, not at the end of a run."""
    if not keep:
        return None
    if not keep.startswith(KEEP_BEST):
        raise UsageError(f"--keep {keep!r}: expected best:TASK/METRIC", hint="e.g. --keep best:synth/acc")
    name = keep[len(KEEP_BEST):].removeprefix(METRIC_PREFIX)
    task, _, metric = name.partition("/")
    if task not in TRAINING_EVAL_TASKS or metric not in SYNTH_METRICS:
        known = ", ".join(f"{t}/{m}" for t in TRAINING_EVAL_TASKS for m in SYNTH_METRICS)
        raise UsageError(f"--keep {keep!r}: no evaluation reports {name!r}", hint=f"one of: {known}")
    return f"{METRIC_PREFIX}{task}/{metric}"


def check_eval_options(cfg) -> None:
    """The checks every training stage runs on its evaluation options (eval_tasks, eval_n, eval_synth,
    eval_batch_size, keep, data): at config validation, before anything loads."""
    unknown = [t for t in cfg.eval_tasks if t not in TRAINING_EVAL_TASKS]
    specs = [t for t in unknown if t.split(":")[0] in TRAINING_EVAL_TASKS]
    if specs:   # a data spec (synth:test:6) where the task's name goes
        raise UsageError(f"--eval-tasks {specs[0]}: name the task ({specs[0].split(':')[0]}), not a data spec",
                         hint=f"--eval-tasks {specs[0].split(':')[0]} --eval-n N evaluates on the first N problems of "
                              f"{cfg.eval_synth} (--set eval_synth=... picks the pool)")
    if unknown:
        raise UsageError(f"--eval-tasks {','.join(unknown)}: a training stage evaluates only on "
                         f"{', '.join(TRAINING_EVAL_TASKS)} as it runs",
                         hint="benchmark the finished checkpoint (or its #best) with prism eval --tasks ...")
    if len(set(cfg.eval_tasks)) != len(cfg.eval_tasks):
        raise UsageError(f"--eval-tasks names a task twice: {','.join(cfg.eval_tasks)}")
    if cfg.eval_n < 1 or cfg.eval_batch_size < 1:
        raise UsageError("eval_n and eval_batch_size must be >= 1")
    least = 0 if hasattr(cfg, "max_new_tokens") else 1     # 0: the stage's own max_new_tokens, where it has one
    if cfg.eval_max_new_tokens < least:
        raise UsageError(f"--eval-max-new-tokens must be >= {least}, not {cfg.eval_max_new_tokens}")
    if parse_spec(cfg.eval_synth).split != "test":
        raise UsageError(f"eval_synth {cfg.eval_synth!r} is not synth's test split: the held-out problems must not "
                         "be training problems", hint="e.g. synth:test:200")
    if cfg.eval_tasks and any(str(d).startswith("synth:") and "test" in str(d).split(":") for d in cfg.data):
        raise UsageError("--data trains on synth's test split, the problems the held-out evaluation measures",
                         hint="train on synth:train (the default split) or drop --eval-tasks")
    metric = parse_keep(cfg.keep)
    if metric is not None and metric.split("/")[1] not in cfg.eval_tasks:
        raise UsageError(f"--keep {cfg.keep} ranks by an evaluation this run does not make",
                         hint=f"add --eval-tasks {metric.split('/')[1]} (and --eval-every N)")


def plan_row(cfg, steps: int, rollouts: int) -> list[str] | None:
    """--dry-run's line on the evaluation's cost: how many evaluations, problems and greedy generations, against
    the training rollouts of the run."""
    if not cfg.eval_tasks:
        return None
    count = evaluations_planned(steps, cfg.eval_every) + 1      # and the start, before the first step
    generations = count * cfg.eval_n
    share = f", {100 * generations / rollouts:.0f}% of the run's {rollouts} training rollouts" if rollouts else ""
    keep = f"; keeps the best {parse_keep(cfg.keep)} in best/" if cfg.keep else ""
    return ["held-out eval", f"{','.join(cfg.eval_tasks)}: {count} evaluations (step 0, every {cfg.eval_every} and "
                             f"the end) x {cfg.eval_n} test problems, greedy, max "
                             f"{cfg.eval_max_new_tokens or getattr(cfg, 'max_new_tokens', 0)} new tokens: "
                             f"{generations} generations{share}{keep}; the log gives each evaluation's seconds"]


def eval_due(step: int, every: int, last_step: int) -> bool:
    """Whether the evaluation runs after optimizer step `step` (1-based): every `every` steps, and at the end."""
    return step % every == 0 or step == last_step


def evaluations_planned(steps: int, every: int) -> int:
    """How many evaluations a run of `steps` steps makes (what --dry-run prices)."""
    return sum(eval_due(s, every, steps) for s in range(1, steps + 1))


def rank_share(n: int, rank: int, world: int) -> tuple[list[int], int]:
    """(the problem indices this rank evaluates, how many it generates for). Contiguous shares of ceil(n / world);
    a short share is padded with repeats of its own first index (or 0) so every rank makes the same generate calls
    (lockstep: under sharded parameters each forward is a collective), and the padding's answers are dropped."""
    share = -(-n // world)
    mine = list(range(rank * share, min((rank + 1) * share, n)))
    return mine, share


def padded(mine: list[int], share: int) -> list[int]:
    """mine padded to share entries with repeats (see rank_share)."""
    return mine + [mine[0] if mine else 0] * (share - len(mine))


def is_better(value: float, best: float | None) -> bool:
    """Strictly higher than the best so far (every --keep metric is higher-is-better): a tie keeps the earlier
    checkpoint, which trained less to reach the same score. NaN is never better."""
    return value == value and (best is None or value > best)


def pick_best(records: list[dict], metric: str) -> dict | None:
    """{"metric", "step", "value"} of the best evaluation among metrics records, by the rule of is_better."""
    best = None
    for record in records:
        value = record.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                is_better(float(value), None if best is None else best["value"]):
            best = {"metric": metric, "step": int(record["step"]), "value": float(value)}
    return best
