"""What `--tasks` names mean, and how each benchmark is scored without a judge.

A short alias (mathvista, mmmu, ...) maps to the benchmark the paper evaluated (docs/method.md, "Evaluation"). With
`--judge none` every alias runs as one of the task overrides shipped in stages/eval/lmms_tasks/
(`prism_*`): the same dataset and split as the official lmms-eval task, our prompt (the question and its
options, under the protocol system prompt), and a rule-based scorer from this module instead of an LLM
judge. With `--judge URL#MODEL` the benchmarks whose official scorer is a judge run as the official
lmms-eval task instead. Any other name is passed to lmms-eval unchanged.

The scorers are pure functions `score_<bench>(doc, response) -> {"acc", "format", "pred"}` of a dataset
row and the model's full protocol response, so they are tested on hand-made rows.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from stages.common.contract.errors import UsageError
from stages.common.contract.registry import Registry
from stages.common.evaluation.synth import rule_score
from stages.common.protocol import parse_response

LMMS_TASK_DIR_NAME = "lmms_tasks"


@dataclass(frozen=True)
class DataSpec:
    """The dataset one lmms-eval task reads: where lmms-eval fetches it and the columns its code reads
    (stages.eval.task_data checks a local --task-data copy against it)."""

    hub_id: str
    config: str | None
    split: str
    columns: dict = field(default_factory=dict)  # column -> kind (stages.eval.task_data.KINDS)


def data_spec(hub_id, config, split_name, **columns) -> DataSpec:
    """Columns as keywords; `__` stands for a space (WeMath's "knowledge concept"), `split_` for `split`."""
    return DataSpec(hub_id, config, split_name,
                    {k.rstrip("_").replace("__", " "): v for k, v in columns.items()})


@dataclass(frozen=True)
class Benchmark:
    alias: str
    scorers: dict                     # prism_* task shipped in lmms_tasks/ (rule-scored) -> its scorer
    official_tasks: tuple[str, ...]   # what the paper ran in lmms-eval
    official_metric: str              # the official task's headline metric (judge mode)
    needs_judge: bool                 # the official scorer is an LLM judge
    note: str                         # how rule scoring differs from the official number
    data: dict = field(default_factory=dict)   # task (prism_* and official) -> the DataSpec it reads
    paper: bool = False                # one of the paper's benchmarks: counted in its headline average

    @property
    def override_tasks(self) -> tuple[str, ...]:
        """The prism_* tasks, averaged into one number."""
        return tuple(self.scorers)


ALIASES = {"hallusion": "hallusionbench", "hallusion_bench": "hallusionbench", "mmmu-pro": "mmmu_pro"}
NATIVE_TASKS = ("synth",)
_TASK_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class TaskPlan:
    """One column of the results table: what runs and how it is scored."""

    name: str                   # the column name (alias, or the lmms-eval task name as given)
    backend: str                # "native" | "lmms"
    lmms_tasks: tuple[str, ...]  # lmms-eval task names to run (empty for native)
    scorer: str                 # "rule" | "judge" | "official"
    metric: str                 # metric key read from lmms-eval results ("acc" for the overrides)


def split_names(values: list[str] | str) -> list[str]:
    """`--tasks a,b --tasks c` -> [a, b, c], order kept, duplicates dropped."""
    items = [values] if isinstance(values, str) else list(values)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def plan_task(name: str, judge: str = "none", synth_backend: str = "native") -> TaskPlan:
    alias = ALIASES.get(name.lower(), name.lower())
    if alias == "synth":
        if synth_backend == "lmms":
            return TaskPlan("synth", "lmms", ("prism_synth",), "rule", "acc")
        return TaskPlan("synth", "native", (), "rule", "acc")
    if alias in BENCHMARKS:
        bench = BENCHMARKS.get(alias)
        if judge != "none" and bench.needs_judge:
            return TaskPlan(alias, "lmms", bench.official_tasks, "judge", bench.official_metric)
        return TaskPlan(alias, "lmms", bench.override_tasks, "rule", "acc")
    if not _TASK_NAME.match(name):
        raise UsageError(f"--tasks: {name!r} is not a task name",
                         hint=f"use {', '.join(task_names())} or an lmms-eval task name")
    return TaskPlan(name, "lmms", (name,), "official", "")


def plan_tasks(names: list[str] | str, judge: str = "none", synth_backend: str = "native") -> list[TaskPlan]:
    names = split_names(names)
    if not names:
        raise UsageError("--tasks is empty", hint=f"e.g. --tasks synth or --tasks {','.join(PAPER_TASKS)}")
    return [plan_task(n, judge, synth_backend) for n in names]


def parse_judge(judge: str) -> tuple[str, str] | None:
    """`none` -> None; `URL#MODEL` -> (url, model)."""
    if not judge or judge == "none":
        return None
    url, sep, model = judge.partition("#")
    if not sep or not url.startswith(("http://", "https://")) or not model:
        raise UsageError(f"--judge {judge!r} is not 'none' or URL#MODEL",
                         hint="e.g. --judge http://localhost:8000/v1/chat/completions#Qwen/Qwen3-32B")
    return url, model


# ------------------------------------------------------------------------------------------ rule scoring

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# "A. text", "(A) text", "A: text", "A) text" at the start of a line
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):：]\s*(.*?)\s*$", re.M)


def options_in_text(text: str) -> list[str]:
    """The lettered options listed in a prompt (A, B, C... in order), [] if it lists none."""
    found = _OPTION_LINE.findall(text or "")
    options: list[str] = []
    for letter, body in found:
        if letter != LETTERS[len(options)]:
            if letter == "A":  # a second list starts: keep the last complete one
                options = []
            else:
                continue
        options.append(body)
    return options if len(options) >= 2 else []


def parse_option_list(value) -> list[str]:
    """MMMU stores options as the text of a Python list; other sets as a list. Never raises."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value)
            if isinstance(parsed, (list, tuple)):
                return [str(v) for v in parsed]
        except (ValueError, SyntaxError):
            return []
    return []


def letter_of(answer: str, choices: list[str]) -> str | None:
    """The option letter of a ground truth given as a letter or as the option's text."""
    answer = str(answer).strip()
    if len(answer) == 1 and answer.upper() in LETTERS[:len(choices)]:
        return answer.upper()
    for i, c in enumerate(choices):
        if str(c).strip() == answer:
            return LETTERS[i]
    return None


def score_choice(response: str, answer: str, choices: list[str]) -> dict:
    """Multiple choice: right if the letter or the option's text is given."""
    letter = letter_of(answer, choices)
    if letter is None:  # the ground truth is not among the options: compare values
        return rule_score(response, answer)
    option_text = str(choices[LETTERS.index(letter)])
    return rule_score(response, letter, choices=choices, equivalents=[option_text])


def score_mathvista(doc: dict, response: str) -> dict:
    choices = [str(c) for c in (doc.get("choices") or [])]
    if doc.get("question_type") == "multi_choice" and choices:
        return score_choice(response, doc["answer"], choices)
    return rule_score(response, doc["answer"])


def score_mathvision(doc: dict, response: str) -> dict:
    choices = [str(c) for c in (doc.get("options") or [])]
    if choices:
        return score_choice(response, doc["answer"], choices)
    return rule_score(response, doc["answer"])


def score_mathverse(doc: dict, response: str) -> dict:
    choices = options_in_text(doc.get("query_wo") or doc.get("question") or "")
    if doc.get("question_type") == "multi-choice" and choices:
        return score_choice(response, doc["answer"], choices)
    return rule_score(response, doc["answer"])


def score_wemath(doc: dict, response: str) -> dict:
    choices = options_in_text(str(doc.get("option", "")).replace(";", "\n"))
    if choices:
        return score_choice(response, doc["answer"], choices)
    return rule_score(response, doc["answer"])


def score_mmmu(doc: dict, response: str) -> dict:
    choices = parse_option_list(doc.get("options"))
    if doc.get("question_type", "multiple-choice") == "multiple-choice" and choices:
        return score_choice(response, doc["answer"], choices)
    answers = parse_option_list(doc["answer"]) or [str(doc["answer"])]
    return rule_score(response, answers[0], equivalents=answers[1:])


def score_mmmu_pro_vision(doc: dict, response: str) -> dict:
    """The options are drawn inside the image; the ground truth is their letter."""
    choices = parse_option_list(doc.get("options")) or list(LETTERS[:10])
    return score_choice(response, doc["answer"], choices)


def yes_no(text: str | None) -> str | None:
    """'yes' / 'no' from a short answer ("Yes.", "no, it is not", "(A) yes"), None if neither or both."""
    words = set(re.findall(r"[a-z]+", (text or "").lower()))
    has_yes, has_no = bool(words & {"yes", "true", "correct"}), bool(words & {"no", "not", "false", "incorrect"})
    if has_yes == has_no:
        return None
    return "yes" if has_yes else "no"


def score_hallusion(doc: dict, response: str) -> dict:
    """HallusionBench: gt_answer 1 = yes, 0 = no; the answer is read from <answer> (whole text otherwise)."""
    parsed = parse_response(response)
    pred = yes_no(parsed.answer if parsed.answer is not None else response)
    truth = "yes" if str(doc.get("gt_answer", "")).strip() in ("1", "yes", "Yes") else "no"
    return {"acc": float(pred == truth), "format": float(parsed.format_ok), "pred": pred}


# The columns each benchmark's tasks read (stages/eval/lmms_tasks/utils.py and lmms-eval's task utils).
_MMMU_IMAGES = {f"image_{i}": "image" for i in range(1, 8)}
_MATHVISTA = dict(question="text", decoded_image="image", choices="list", question_type="text", answer="text",
                  unit="text")
_MATHVERSE = dict(question="text", image="image", answer="text", question_type="text", query_wo="text")
_MATHVISION = dict(question="text", decoded_image="image", options="list", answer="text")
_WEMATH = dict(question="text", option="text", answer="text", image_path="image")
_MMMU = dict(id="text", question="text", options="text", answer="text", **_MMMU_IMAGES)
_HALLUSION = dict(question="text", image="image", gt_answer="scalar")

# The benchmarks --tasks knows by a short name, the paper's seven first (paper=True: its headline average). Adding
# one: a row here (with its scorer above and the data its tasks read), its prism_* YAML in lmms_tasks/, a test
# (docs/extending.md). A new row is not in the paper's average unless it says paper=True.
BENCHMARKS: Registry[Benchmark] = Registry("benchmark task", "--tasks")
for _bench in [
    Benchmark("mathvista", {"prism_mathvista_testmini": score_mathvista}, ("mathvista_testmini_cot",),
              "llm_as_judge_eval", True,
              "answer from <answer>; option letter or option text for multiple choice; numbers compared at the "
              "question's precision; official: GPT answer extraction then exact match",
              paper=True,
              data={"prism_mathvista_testmini": data_spec("AI4Math/MathVista", None, "testmini", **_MATHVISTA),
                    "mathvista_testmini_cot": data_spec("AI4Math/MathVista", None, "testmini", **_MATHVISTA,
                                                        pid="text", query="text", answer_type="text",
                                                        precision="scalar", metadata="any")}),
    Benchmark("mathverse", {"prism_mathverse_testmini": score_mathverse}, ("mathverse_testmini",),
              "gpt_eval_score", True,
              "answer from <answer> matched by rules + math-verify; official: GPT extraction and GPT judgement",
              paper=True,
              data={"prism_mathverse_testmini": data_spec("CaraJ/MathVerse-lmmseval", "testmini", "testmini",
                                                          **_MATHVERSE),
                    "mathverse_testmini": data_spec("CaraJ/MathVerse-lmmseval", "testmini", "testmini", **_MATHVERSE,
                                                    query_cot="text", problem_version="text",
                                                    question_for_eval="text", sample_index="any",
                                                    problem_index="any", metadata="any")}),
    Benchmark("mathvision", {"prism_mathvision_testmini": score_mathvision}, ("mathvision_testmini",),
              "mathvision_standard_eval", False,
              "same kind of rule as the official scorer (letter / value match), math-verify for LaTeX",
              paper=True,
              data={"prism_mathvision_testmini": data_spec("MathLLMs/MathVision", None, "testmini", **_MATHVISION),
                    "mathvision_testmini": data_spec("MathLLMs/MathVision", None, "testmini", **_MATHVISION)}),
    Benchmark("wemath", {"prism_wemath_testmini": score_wemath}, ("wemath_testmini_reasoning",), "acc_score", False,
              "per-question accuracy, the option letter or the option's text (the official reasoning task's "
              "acc_score reads the letter only); WeMath's loose/strict four-dimensional scores are not computed",
              paper=True,
              data={"prism_wemath_testmini": data_spec("We-Math/We-Math", None, "testmini", **_WEMATH),
                    "wemath_testmini_reasoning": data_spec("We-Math/We-Math", None, "testmini", **_WEMATH, ID="any",
                                                           split_="any", knowledge__concept="any", key="any",
                                                           question__number="any",
                                                           knowledge__concept__description="any")}),
    Benchmark("mmmu", {"prism_mmmu_val": score_mmmu}, ("mmmu_val",), "mmmu_acc", False,
              "option letter (or option text) for multiple choice, normalised string/number match for open "
              "questions, any item of an answer list; official: option text only in replies over five words "
              "(a random letter otherwise), answer lists compared as text (docs/eval-offline.md)",
              paper=True,
              data={"prism_mmmu_val": data_spec("lmms-lab-encoder/MMMU", None, "validation", **_MMMU,
                                                question_type="text"),
                    "mmmu_val": data_spec("lmms-lab-encoder/MMMU", None, "validation", **_MMMU,
                                          question_type="text")}),
    Benchmark("mmmu_pro", {"prism_mmmu_pro_standard": score_mmmu, "prism_mmmu_pro_vision": score_mmmu_pro_vision},
              ("mmmu_pro",), "mmmu_acc", False,
              "mean of the standard (10 options) and vision subsets, as the official group; vision: '(A)' reads "
              "as A (official: the reply must be the bare letter)",
              paper=True,
              data={"prism_mmmu_pro_standard": data_spec("MMMU/MMMU_Pro", "standard (10 options)", "test", **_MMMU),
                    "mmmu_pro_standard": data_spec("MMMU/MMMU_Pro", "standard (10 options)", "test", **_MMMU,
                                                   subject="text"),
                    "prism_mmmu_pro_vision": data_spec("MMMU/MMMU_Pro", "vision", "test", image="image",
                                                       options="text", answer="text"),
                    "mmmu_pro_vision": data_spec("MMMU/MMMU_Pro", "vision", "test", id="text", image="image",
                                                 options="text", answer="text", subject="text")}),
    Benchmark("hallusionbench", {"prism_hallusion_bench_image": score_hallusion}, ("hallusion_bench_image",),
              "aAcc", True,
              "aAcc by a yes/no rule on <answer>; official: GPT decides yes/no/uncertain; qAcc/fAcc not reported",
              paper=True,
              data={"prism_hallusion_bench_image": data_spec("lmms-lab-encoder/HallusionBench", None, "image",
                                                             **_HALLUSION),
                    "hallusion_bench_image": data_spec("lmms-lab-encoder/HallusionBench", None, "image", **_HALLUSION,
                                                       gt_answer_details="text", category="text",
                                                       subcategory="text", set_id="any", figure_id="any",
                                                       question_id="any")}),
]:
    BENCHMARKS.register(_bench.alias, _bench)
PAPER_TASKS = tuple(name for name, bench in BENCHMARKS.items() if bench.paper)
SCORERS = {task: scorer for bench in BENCHMARKS.values() for task, scorer in bench.scorers.items()}


def task_names() -> list[str]:
    """Every name --tasks knows besides lmms-eval's own: the native tasks, then the benchmarks."""
    return [*NATIVE_TASKS, *BENCHMARKS.names()]
