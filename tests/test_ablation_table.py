"""benchmarks/ablation_table.py, the ablation's arithmetic, on hand-made evaluations: the seed interval, the
perception measures read from responses, the paired differences, the game's evidence, and refusals."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from stages.common.world.synth import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("ablation_table", ROOT / "benchmarks" / "ablation_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interval_is_the_students_t_half_width(table):
    mean, half = table.interval([0.40, 0.50, 0.60])
    assert mean == pytest.approx(0.5)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))  # sd 0.1, t(0.975, 2 df) = 4.303
    assert table.interval([0.3]) == (0.3, None)
    assert table.interval([0.2, 0.2])[1] == 0.0


def test_rows_come_from_the_checkpoint_ref(table):
    assert table.row_of("/x/out/seed2/mix-prism-dapo") == ("mix-prism-dapo", "2")
    assert table.row_of("tiny-seeing") == ("base", "-")


def caption(objects):
    return "\n".join(f"- {o['color']} {o['shape']}" for o in objects)


def response(objs, answer):
    return f"<caption>\n{caption(objs)}\n</caption>\n<think>\nx\n</think>\n<answer>{answer}</answer>"


def record(sample, text, acc, f1):
    return {"id": sample.id, "task": sample.task, "response": text, "acc": acc, "format": 1.0, "caption_f1": f1,
            "caption_precision": f1, "caption_recall": f1}  # the fields prism eval's samples carry


def test_score_records_reads_counts_green_recall_and_the_error_split(table):
    samples = [s for s in generate("test", 40, seed=0, tasks=["count_color"])]
    green = next(s for s in samples if any(o["color"] == "green" for o in s.meta["scene"]["objects"]))
    other = next(s for s in samples if len(s.meta["scene"]["objects"]) >= 2
                 and all(o["color"] != "green" for o in s.meta["scene"]["objects"]))
    objs = green.meta["scene"]["objects"]
    n_green = sum(o["color"] == "green" for o in objs)
    blued = [dict(o, color="blue") if o["color"] == "green" else o for o in objs]  # the drift's confusion
    dropped = other.meta["scene"]["objects"][:-1]                                 # the drift's dropped object
    scenes = {s.id: s.meta["scene"] for s in samples}
    got = table.score_records([record(green, response(blued, "0"), 0.0, 0.5),      # perception error
                               record(other, response(dropped, "9"), 0.0, 1.0)],   # "reasoning": F1 said right
                              scenes)
    assert got["n"] == 2 and got["acc"] == 0.0
    assert got["exact_count"] == 0.5          # the recoloured caption names as many things; the other drops one
    assert got["green_recall"] == 0.0 and n_green >= 1
    assert got["perception_errors"] == 0.5 and got["reasoning_errors"] == 0.5
    assert got["acc_by_task"] == {"count_color": 0.0}
    right = table.score_records([record(green, response(objs, green.answer), 1.0, 1.0)], scenes)
    assert right["green_recall"] == 1.0 and right["exact_count"] == 1.0 and right["perception_errors"] == 0.0


def write_eval(directory: Path, ref: str, records: list[dict]) -> None:
    (directory / "samples").mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({"checkpoint": {"ref": ref}, "tasks": {"synth": {}}}))
    (directory / "samples" / "synth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_collect_pairs_rows_by_seed_and_problem_and_reads_the_game(table, tmp_path):
    samples = generate("test", 4, seed=0, first=10)   # a slice that does not start at 0, as the design's
    right = [record(s, response(s.meta["scene"].get("objects", []), s.answer), 1.0, 1.0) for s in samples]
    wrong = [dict(r, acc=0.0) for r in right]
    for seed, teacher, aligned in (("0", wrong, right), ("1", wrong, wrong)):
        write_eval(tmp_path / f"seed{seed}" / "evals" / "eval-sft-teacher",
                   str(tmp_path / f"seed{seed}" / "sft-teacher"), teacher)
        write_eval(tmp_path / f"seed{seed}" / "evals" / "eval-sft-prism", str(tmp_path / f"seed{seed}" / "sft-prism"),
                   aligned)
    game = tmp_path / "seed0" / "sft-prism"
    game.mkdir()
    lines = [{"phase": "warmup_done", "step": 0, "warmup/heldout_acc_caption": 0.75, "warmup/held_out": 128}]
    lines += [{"step": i, "gap/caption": 1.0 - i / 10, "gap/think": 0.1, "d/acc_caption": 0.9, "d/acc_think": 0.5,
               "advantage/std": 0.3} for i in range(1, 11)]
    (game / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "seed0" / "sft-prism-dapo").mkdir()  # an RL run after align: not a game
    (tmp_path / "seed0" / "sft-prism-dapo" / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")

    data = table.collect(tmp_path, 4, 10)
    assert data["rows"]["sft-teacher"]["0"]["acc"] == 0.0 and data["rows"]["sft-prism"]["0"]["acc"] == 1.0
    assert data["rows"]["sft-prism"]["0"]["acc_bits"] == "1111" and data["rows"]["sft-prism"]["1"]["acc_bits"] == "0000"
    assert set(data["games"]) == {"sft-prism"}
    g = data["games"]["sft-prism"]["0"]
    assert g["warmup/heldout_acc_caption"] == 0.75 and g["warmup/held_out"] == 128
    assert g["first gap/caption"] == pytest.approx(0.85) and g["last gap/caption"] == pytest.approx(0.05)
    data["comparisons"] = table.comparisons(data, ["0", "1"])
    (p5,) = data["comparisons"]                         # the only design comparison whose rows exist here
    assert (p5["id"], p5["row"], p5["ref"], p5["primary"]) == ("P5", "sft-prism", "sft-teacher", False)
    assert p5["acc"]["diff"] == pytest.approx(0.5) and p5["acc"]["seeds"] == 2 and p5["acc"]["problems"] == 4
    assert p5["acc"]["low"] == 0.0 and p5["acc"]["high"] == 1.0   # seed 0 drawn twice: +100; seed 1 twice: 0
    assert p5["wins_losses"] == {"0": [4, 0], "1": [0, 0]}
    md = table.tables(data, ["0", "1"], 4, 10)
    assert "4 synth test problems (10 to 13)" in md
    paired = next(line for line in md.splitlines() if line.startswith("| P5 |"))
    assert "+50.0 [+0.0, +100.0]" in paired and "4/0, 0/0 (total 4/0)" in paired
    per_seed = next(line for line in md.splitlines() if line.startswith("| SFT -> PRISM |"))
    assert per_seed.split("|")[2].strip() == f"50.0 ± {100 * 12.706 * math.sqrt(0.5) / math.sqrt(2):.1f}"
    with pytest.raises(SystemExit, match="expected 5"):
        table.collect(tmp_path, 5, 10)
    with pytest.raises(SystemExit, match="from test problem 0"):
        table.collect(tmp_path, 4, 0)                   # the evaluations hold problems 10-13, not 0-3


def test_green_recall_is_compared_as_a_ratio_of_sums(table):
    problems = {r: {"0": {"p1": {"acc": 1.0, "caption_f1": 1.0, "green_hits": h1, "greens": 1},
                          "p2": {"acc": 1.0, "caption_f1": 1.0, "green_hits": h2, "greens": 3},
                          "p3": {"acc": 0.0, "caption_f1": 0.5, "green_hits": 0, "greens": 0}}}
                for r, h1, h2 in (("a", 1, 3), ("b", 0, 1))}
    got = table.compare_rows(problems, "a", "b", ["0"], n_boot=200)
    assert got["green_recall"]["diff"] == pytest.approx(4 / 4 - 1 / 4)   # pooled: 4 of 4 greens against 1 of 4
    assert got["acc"]["diff"] == 0.0 and got["wins_losses"] == {"0": [0, 0]}
