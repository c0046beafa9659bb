"""Prompt and scoring functions of the prism_* lmms-eval tasks (YAMLs beside this file).

The YAMLs name these with absolute module paths (`!function stages.eval.lmms_tasks.utils.fn`), so a task
YAML also works when written elsewhere (the synth task is written next to its parquet at run time).
Prompts are the question and its lettered options only: the plugin adds the protocol system prompt, and
the scorers in stages.eval.tasks read the answer from <answer>.
"""

from __future__ import annotations

import json
import re

from stages.common.contract.samples import Sample
from stages.common.data.chat import question_text
from stages.eval import tasks
from stages.common.evaluation.synth import score_synth

_IMAGE_TAG = re.compile(r"<image (\d+)>")


def with_options(question: str, options: list[str]) -> str:
    if not options:
        return question.strip()
    listed = "\n".join(f"{tasks.LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question.strip()}\nOptions:\n{listed}"


def rgb(image):
    return image.convert("RGB")


# ---- MathVista ----------------------------------------------------------------------------------------

def mathvista_doc_to_visual(doc):
    return [rgb(doc["decoded_image"])]


def mathvista_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    question = doc["question"]
    if doc.get("unit"):
        question += f" (unit: {doc['unit']})"
    choices = list(doc.get("choices") or []) if doc.get("question_type") == "multi_choice" else []
    return with_options(question, choices)


# ---- MathVision ---------------------------------------------------------------------------------------

def mathvision_doc_to_visual(doc):
    return [rgb(doc["decoded_image"])]


def mathvision_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return with_options(doc["question"], list(doc.get("options") or []))


# ---- MathVerse (the question text lists the options itself) -------------------------------------------

def mathverse_doc_to_visual(doc):
    image = doc.get("image")
    return [rgb(image)] if image is not None and str(image).strip() else []


def mathverse_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"].strip()


# ---- WeMath -------------------------------------------------------------------------------------------

def wemath_doc_to_visual(doc):
    return [rgb(doc["image_path"])]


def wemath_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question'].strip()}\n{doc['option']}"


# ---- MMMU / MMMU-Pro ----------------------------------------------------------------------------------

def mmmu_image_keys(doc) -> list[str]:
    """image_N fields the question or options mention, by N (as the official task orders them)."""
    text = doc.get("question", "") + " " + str(doc.get("options", ""))
    numbers = sorted({int(n) for n in _IMAGE_TAG.findall(text)})
    return [f"image_{n}" for n in numbers if doc.get(f"image_{n}") is not None]


def mmmu_doc_to_visual(doc):
    return [rgb(doc[k]) for k in mmmu_image_keys(doc)]


def mmmu_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = tasks.parse_option_list(doc.get("options"))
    if doc.get("question_type", "multiple-choice") != "multiple-choice":
        options = []
    return with_options(doc["question"], options)


def mmmu_pro_vision_doc_to_visual(doc):
    return [rgb(doc["image"])]


def mmmu_pro_vision_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "Answer the question in the image with the letter of the correct option."


# ---- HallusionBench -----------------------------------------------------------------------------------

def hallusion_doc_to_visual(doc):
    return [rgb(doc["image"])] if doc.get("image") is not None else []


def hallusion_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"{doc['question'].strip()} Answer yes or no."


# ---- synth (written with its parquet by stages.eval.synth_native.write_lmms_task) ----------------------

def synth_doc_to_visual(doc):
    return [rgb(doc["image"])]


def synth_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return question_text(synth_sample(doc))


def synth_sample(doc):
    return Sample(id=str(doc["id"]), images=[], question=doc["question"], answer=doc["answer"],
                  choices=json.loads(doc["choices"]) if doc.get("choices") else None, task=doc.get("task", ""),
                  source="synth", meta=json.loads(doc["meta"]) if doc.get("meta") else {})


def process_prism_synth(doc, results):
    scored = score_synth(synth_sample(doc), results[0])
    return {"acc": scored["acc"], "format": scored["format"], "caption_f1": scored["caption_f1"]}


# ---- process_results of the overrides: the rule scorers of stages.eval.tasks ---------------------------

def _metrics(task_name: str, doc, results) -> dict:
    scored = tasks.SCORERS[task_name](doc, results[0] if results else "")
    return {"acc": scored["acc"], "format": scored["format"]}


def _process_results(task_name: str):
    def process(doc, results):
        return _metrics(task_name, doc, results)
    process.__name__ = process.__qualname__ = f"process_{task_name}"
    return process


# One `process_<task>` per row of stages.eval.tasks.BENCHMARKS, the name its YAML's process_results gives
# (lmms-eval passes only doc and results, so the task name is bound here).
for _task in tasks.SCORERS:
    globals()[f"process_{_task}"] = _process_results(_task)
