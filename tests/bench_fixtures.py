"""A few rows of each of the paper's seven benchmarks, in the real dataset's schema, for the --task-data tests.

Each fixture is the dataset as the hub serves it (column names, `datasets` feature types, split and config;
images as PNG bytes in an Image column, MathVista/MathVision's path column beside it; MMMU's options as the
text of a Python list), plus per row what the stand-in model answers, the score worked out by hand, the
exact prompt text the model must see and the colours of the images it must get (every image in this module
has its own colour, so a response is chosen by the image that arrives).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

S = Value("string")


def response(answer: str) -> str:
    return f"<caption>- a figure</caption><think>worked it out</think><answer>{answer}</answer>"


@dataclass
class Row:
    doc: dict
    answer: str            # the text inside <answer> the stand-in model gives
    acc: float             # prism's score of that answer, worked out by hand
    prompt: str            # the text the model must see
    colors: tuple          # the colours of the images the model must see, in order
    official: float | None = None  # the official rule scorer's verdict (worked out by hand); None where it guesses


@dataclass
class Fixture:
    alias: str
    tasks: tuple            # prism tasks (MMMU-Pro: standard, vision)
    hub_id: str
    config: str | None      # per task when a tuple
    split: str
    features: Features
    rows: list


_next_color = [0]


def color() -> tuple:
    """A new colour, different from the 39 before it (all_fixtures() starts the count again)."""
    _next_color[0] += 1
    i = _next_color[0]
    return (40 * (i % 6) + 15, 37 * (i // 6 % 6) + 20, 30 + 5 * i % 200)


def png(rgb: tuple, size=(48, 40)) -> dict:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, rgb).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


# ---------------------------------------------------------------------------------------------- MathVista

MATHVISTA_FEATURES = Features({
    "pid": S, "question": S, "image": S, "decoded_image": Image(), "choices": List(S), "unit": S,
    "precision": Value("float64"), "answer": S, "question_type": S, "answer_type": S,
    "metadata": {"category": S, "context": S, "grade": S, "img_height": Value("int64"), "img_width": Value("int64"),
                 "language": S, "skills": List(S), "source": S, "split": S, "task": S},
    "query": S,
})


def mathvista_row(pid, question, choices, unit, precision, answer, answer_type, reply, acc, prompt):
    c = color()
    meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school",
            "img_height": 40, "img_width": 48, "language": "english", "skills": ["arithmetic reasoning"],
            "source": "GeoQA+", "split": "testmini", "task": "geometry problem solving"}
    question_type = "multi_choice" if choices else "free_form"
    doc = {"pid": pid, "question": question, "image": f"images/{pid}.jpg", "decoded_image": png(c),
           "choices": choices, "unit": unit, "precision": precision, "answer": answer,
           "question_type": question_type, "answer_type": answer_type, "metadata": meta,
           "query": f"Hint: Please answer the question.\nQuestion: {question}"}
    return Row(doc, reply, acc, prompt, (c,))


def mathvista() -> Fixture:
    rows = [
        # multiple choice answered by letter: the ground truth is the option text "5" = B
        mathvista_row("1", "How many sides does the shape have?", ["3", "5", "7"], None, None, "5", "text", "B", 1.0,
                      "How many sides does the shape have?\nOptions:\nA. 3\nB. 5\nC. 7"),
        # multiple choice answered by the option's text
        mathvista_row("2", "Which shape is shown?", ["circle", "square", "triangle"], None, None, "square", "text",
                      "square", 1.0, "Which shape is shown?\nOptions:\nA. circle\nB. square\nC. triangle"),
        # a number with its unit: the unit goes into the prompt, "14 cm" is the value 14
        mathvista_row("3", "How long is the bar?", None, "cm", None, "14", "integer", "14 cm", 1.0,
                      "How long is the bar? (unit: cm)"),
        # a float at precision 1: 0.60 is 0.6, 0.7 is not
        mathvista_row("4", "What is the ratio?", None, None, 1.0, "0.6", "float", "0.7", 0.0, "What is the ratio?"),
        # beyond --limit 4
        mathvista_row("5", "What is the sum?", None, None, None, "9", "integer", "9", 1.0, "What is the sum?"),
    ]
    return Fixture("mathvista", ("prism_mathvista_testmini",), "AI4Math/MathVista", None, "testmini",
                   MATHVISTA_FEATURES, rows)


# ---------------------------------------------------------------------------------------------- MathVerse

MATHVERSE_FEATURES = Features({
    "sample_index": S, "problem_index": S, "problem_version": S, "question": S, "image": Image(), "answer": S,
    "question_type": S, "metadata": {"split": S, "source": S, "subject": S, "subfield": S},
    "query_wo": S, "query_cot": S, "question_for_eval": S,
})


def mathverse_row(index, question, answer, question_type, reply, acc):
    c = color()
    doc = {"sample_index": str(index), "problem_index": str(index), "problem_version": "Text Dominant",
           "question": question, "image": png(c), "answer": answer, "question_type": question_type,
           "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"},
           "query_wo": "Please directly answer the question and provide the correct option letter, e.g., A, B, C, "
                       f"D.\nQuestion: {question}",
           "query_cot": f"Please first conduct reasoning, and then answer the question.\nQuestion: {question}",
           "question_for_eval": question}
    return Row(doc, reply, acc, question, (c,))


def mathverse() -> Fixture:
    angle = "As shown in the figure, AB is parallel to CD. Find the angle 1.\nChoices:\nA:30°\nB:40°\nC:50°\nD:60°"
    rows = [
        mathverse_row(1, angle, "B", "multi-choice", "B", 1.0),           # the letter
        mathverse_row(2, angle, "B", "multi-choice", "40°", 1.0),         # the option's text (read from the question)
        mathverse_row(3, "Find sin 60°.", "\\frac{\\sqrt{3}}{2}", "free-form", "\\dfrac{\\sqrt{3}}{2}", 1.0),  # LaTeX
        mathverse_row(4, "Find the length of AB.", "12", "free-form", "13", 0.0),
    ]
    return Fixture("mathverse", ("prism_mathverse_testmini",), "CaraJ/MathVerse-lmmseval", "testmini", "testmini",
                   MATHVERSE_FEATURES, rows)


# --------------------------------------------------------------------------------------------- MathVision

MATHVISION_FEATURES = Features({
    "id": S, "question": S, "options": List(S), "image": S, "decoded_image": Image(), "answer": S, "solution": S,
    "level": Value("int64"), "subject": S,
})


def mathvision_row(index, question, options, answer, reply, acc, official):
    c = color()
    doc = {"id": str(index), "question": question, "options": options, "image": f"images/{index}.jpg",
           "decoded_image": png(c), "answer": answer, "solution": None, "level": 2, "subject": "metric geometry"}
    listed = "".join(f"\n{'ABCDE'[i]}. {o}" for i, o in enumerate(options))
    return Row(doc, reply, acc, question + ("\nOptions:" + listed if options else ""), (c,), official)


def mathvision() -> Fixture:
    five = ["1", "2", "3", "4", "5"]
    rows = [
        mathvision_row(1, "<image1>\nHow many dots are there?", five, "C", "C", 1.0, 1.0),
        mathvision_row(2, "<image1>\nHow many squares are there?", five, "D", "4", 1.0, 1.0),  # option text
        mathvision_row(3, "<image1>\nWhat is the area?", [], "7.5", "7.50", 1.0, 1.0),         # a number
        mathvision_row(4, "<image1>\nWhat fraction is shaded?", [], "0.75", "\\frac{3}{4}", 1.0, 1.0),  # LaTeX
        mathvision_row(5, "<image1>\nHow many edges?", [], "12", "11", 0.0, 0.0),
    ]
    return Fixture("mathvision", ("prism_mathvision_testmini",), "MathLLMs/MathVision", None, "testmini",
                   MATHVISION_FEATURES, rows)


# ------------------------------------------------------------------------------------------------- WeMath

WEMATH_FEATURES = Features({
    "ID": S, "split": S, "knowledge concept": S, "question": S, "option": S, "answer": S, "image_path": Image(),
    "key": S, "question number": Value("int64"), "knowledge concept description": S,
})


def wemath_row(index, question, option, answer, reply, acc, official):
    c = color()
    doc = {"ID": f"{index}@{index}", "split": "testmini", "knowledge concept": "Perimeter of rectangles",
           "question": question, "option": option, "answer": answer, "image_path": png(c), "key": "1",
           "question number": index, "knowledge concept description": "The perimeter is twice length plus width."}
    return Row(doc, reply, acc, f"{question}\n{option}", (c,), official)


def wemath() -> Fixture:
    option = "A. 10cm; B. 12cm; C. 14cm; D. 16cm; E. No correct answer"
    rows = [
        wemath_row(1, "What is the perimeter of the rectangle?", option, "B", "B", 1.0, 1.0),
        wemath_row(2, "What is the perimeter of the square?", option, "B", "12cm", 1.0, 0.0),  # option text
        wemath_row(3, "What is the perimeter of the triangle?", option, "C", "A", 0.0, 0.0),
        wemath_row(4, "What is the perimeter of the circle?", option, "E", "E. No correct answer", 1.0, 1.0),
    ]
    return Fixture("wemath", ("prism_wemath_testmini",), "We-Math/We-Math", None, "testmini", WEMATH_FEATURES, rows)


# --------------------------------------------------------------------------------------------------- MMMU

_IMAGES = {f"image_{i}": Image() for i in range(1, 8)}
MMMU_FEATURES = Features({
    "id": S, "question": S, "options": S, "explanation": S, **_IMAGES, "img_type": S, "answer": S,
    "topic_difficulty": S, "question_type": S, "subfield": S,
})


def mmmu_row(index, question, options, answer, question_type, reply, acc, official, images=1):
    colors = tuple(color() for _ in range(images))
    doc = {"id": f"validation_Accounting_{index}", "question": question, "options": str(options), "explanation": "",
           **{f"image_{i}": (png(colors[i - 1]) if i <= images else None) for i in range(1, 8)},
           "img_type": "['Tables']", "answer": answer, "topic_difficulty": "Medium", "question_type": question_type,
           "subfield": "Financial Accounting"}
    listed = "".join(f"\n{'ABCDEFGHIJ'[i]}. {o}" for i, o in enumerate(options))
    return Row(doc, reply, acc, question + ("\nOptions:" + listed if options else ""), colors, official)


def mmmu() -> Fixture:
    costs = ["$6", "$7", "$8", "$9"]
    rows = [
        mmmu_row(1, "<image 1> What is the unit cost?", costs, "B", "multiple-choice", "B", 1.0, 1.0),
        # the option's text: lmms-eval's MMMU reads option texts only in replies over five words, and otherwise
        # draws a random letter (None: no fixed verdict)
        mmmu_row(2, "<image 1> What is the unit price?", costs, "C", "multiple-choice", "$8", 1.0, None),
        # an open question whose answers are stored as the text of a list: prism reads the list; lmms-eval's
        # mmmu_val compares the number 42 with the text "['42', '42.0']" and never matches
        mmmu_row(3, "<image 1> How many units were sold?", [], "['42', '42.0']", "open", "42", 1.0, 0.0),
        # two images, in the order the question names them
        mmmu_row(4, "Compare <image 1> with <image 2>. Which cost is lower?", costs, "A", "multiple-choice", "D",
                 0.0, 0.0, images=2),
    ]
    return Fixture("mmmu", ("prism_mmmu_val",), "lmms-lab-encoder/MMMU", None, "validation", MMMU_FEATURES, rows)


# ----------------------------------------------------------------------------------------------- MMMU-Pro

MMMU_PRO_STANDARD_FEATURES = Features({
    "id": S, "question": S, "options": S, "explanation": S, **_IMAGES, "img_type": S, "answer": S,
    "topic_difficulty": S, "subject": S,
})
MMMU_PRO_VISION_FEATURES = Features({"id": S, "image": Image(), "options": S, "answer": S, "subject": S})
MMMU_PRO_VISION_PROMPT = "Answer the question in the image with the letter of the correct option."


def mmmu_pro_standard_row(index, answer, reply, acc, official):
    c = color()
    options = [f"{10 * k} kg" for k in range(1, 11)]
    question = f"<image 1> What is the mass of crate {index}?"
    doc = {"id": f"test_Physics_{index}", "question": question, "options": str(options), "explanation": "",
           **{f"image_{i}": (png(c) if i == 1 else None) for i in range(1, 8)}, "img_type": "['Diagrams']",
           "answer": answer, "topic_difficulty": "Easy", "subject": "Physics"}
    listed = "".join(f"\n{'ABCDEFGHIJ'[i]}. {o}" for i, o in enumerate(options))
    return Row(doc, reply, acc, question + "\nOptions:" + listed, (c,), official)


def mmmu_pro_vision_row(index, answer, reply, acc, official):
    c = color()
    options = [f"option {k}" for k in range(1, 11)]
    doc = {"id": f"test_History_{index}", "image": png(c), "options": str(options), "answer": answer,
           "subject": "History"}
    return Row(doc, reply, acc, MMMU_PRO_VISION_PROMPT, (c,), official)


def mmmu_pro() -> tuple[Fixture, Fixture]:
    standard = [
        mmmu_pro_standard_row(1, "C", "C", 1.0, 1.0),
        mmmu_pro_standard_row(2, "J", "100 kg", 1.0, None),   # the option's text (official: a random letter)
        mmmu_pro_standard_row(3, "B", "E", 0.0, 0.0),
    ]
    vision = [
        mmmu_pro_vision_row(1, "H", "H", 1.0, 1.0),
        mmmu_pro_vision_row(2, "A", "(A)", 1.0, 0.0),      # official: the reply must be the bare letter
        mmmu_pro_vision_row(3, "D", "B", 0.0, 0.0),
    ]
    return (Fixture("mmmu_pro", ("prism_mmmu_pro_standard",), "MMMU/MMMU_Pro", "standard (10 options)", "test",
                    MMMU_PRO_STANDARD_FEATURES, standard),
            Fixture("mmmu_pro", ("prism_mmmu_pro_vision",), "MMMU/MMMU_Pro", "vision", "test",
                    MMMU_PRO_VISION_FEATURES, vision))


# ----------------------------------------------------------------------------------------- HallusionBench

HALLUSION_FEATURES = Features({
    "category": S, "subcategory": S, "visual_input": S, "set_id": S, "figure_id": S, "sample_note": S,
    "question_id": S, "question": S, "gt_answer_details": S, "gt_answer": S, "filename": S, "image": Image(),
})


def hallusion_row(index, question, gt_answer, reply, acc):
    c = color()
    doc = {"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": str(index), "figure_id": "0",
           "sample_note": "circles", "question_id": "0", "question": question,
           "gt_answer_details": "The two circles are the same size.", "gt_answer": gt_answer,
           "filename": f"./VD/illusion/{index}_0.png", "image": png(c)}
    return Row(doc, reply, acc, f"{question} Answer yes or no.", (c,))


def hallusion() -> Fixture:
    rows = [
        hallusion_row(1, "Is the left circle larger than the right one?", "0", "No", 1.0),
        hallusion_row(2, "Are the two circles the same size?", "1", "Yes, they are.", 1.0),
        hallusion_row(3, "Is the top line longer?", "0", "yes", 0.0),
        hallusion_row(4, "Is the bottom line longer?", "0", "It is not.", 1.0),
    ]
    return Fixture("hallusionbench", ("prism_hallusion_bench_image",), "lmms-lab-encoder/HallusionBench", None,
                   "image", HALLUSION_FEATURES, rows)


def all_fixtures() -> list[Fixture]:
    _next_color[0] = 0
    return [mathvista(), mathverse(), mathvision(), wemath(), mmmu(), *mmmu_pro(), hallusion()]


# ------------------------------------------------------------------------------------------------ writing

def dataset(fixture: Fixture, rows: list | None = None) -> datasets.Dataset:
    rows = fixture.rows if rows is None else rows
    return datasets.Dataset.from_list([r.doc for r in rows], features=fixture.features)


def write_copy(fixture: Fixture, directory: Path, layout: str, rows: list | None = None) -> Path:
    """The fixture as a local copy: "saved" (save_to_disk DatasetDict), "parquet" (data/<split>-*.parquet)
    or "snapshot" (parquet plus the hub README's configs). Multi-config datasets go under <config>/."""
    ds = dataset(fixture, rows)
    root = directory / fixture.config if fixture.config and layout != "snapshot" else directory
    if layout == "saved":
        datasets.DatasetDict({fixture.split: ds}).save_to_disk(str(root))
    else:
        sub = f"{fixture.config}/" if fixture.config and layout == "snapshot" else "data/"
        target = directory / sub if layout == "snapshot" else root / "data"
        target.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(target / f"{fixture.split}-00000-of-00001.parquet"))
        if layout == "snapshot":
            readme = directory / "README.md"
            configs = readme.read_text().split("---")[1] if readme.exists() else "\nconfigs:\n"
            configs += (f"- config_name: {json.dumps(fixture.config or 'default')}\n  data_files:\n"
                        f"  - split: {fixture.split}\n    path: {sub}{fixture.split}-*\n")
            readme.write_text(f"---{configs}---\n# {fixture.hub_id} (test copy)\n")
    return directory
