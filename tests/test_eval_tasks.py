"""prism eval's pure pieces: task aliases and plans, rule scoring of every shipped override, comparison table."""

import json

import pytest

from stages.common.contract.errors import UsageError
from stages.eval import compare, tasks
from stages.eval.lmms_tasks import utils as task_utils

GOOD = "<caption>- a chart</caption><think>reasoning</think><answer>{}</answer>"


def test_aliases_map_to_overrides_and_judge_swaps_only_judged_tasks():
    plans = tasks.plan_tasks(["mathvista,mmmu_pro", "hallusion", "synth", "docvqa_val"])
    assert [p.name for p in plans] == ["mathvista", "mmmu_pro", "hallusionbench", "synth", "docvqa_val"]
    assert plans[0].lmms_tasks == ("prism_mathvista_testmini",) and plans[0].scorer == "rule"
    assert plans[1].lmms_tasks == ("prism_mmmu_pro_standard", "prism_mmmu_pro_vision")
    assert plans[3].backend == "native"
    assert plans[4] == tasks.TaskPlan("docvqa_val", "lmms", ("docvqa_val",), "official", "")
    judged = {p.name: p for p in tasks.plan_tasks("mathvista,mmmu,mathverse,hallusionbench", judge="http://j/v1#m")}
    assert judged["mathvista"].lmms_tasks == ("mathvista_testmini_cot",) and judged["mathvista"].scorer == "judge"
    assert judged["mathverse"].lmms_tasks == ("mathverse_testmini",)
    assert judged["hallusionbench"].metric == "aAcc"
    assert judged["mmmu"].lmms_tasks == ("prism_mmmu_val",)  # rule-scorable: stays on the override
    assert tasks.plan_tasks("synth", synth_backend="lmms")[0].lmms_tasks == ("prism_synth",)


@pytest.mark.parametrize("bad", ["", "a b", "../x"])
def test_bad_task_names_are_usage_errors(bad):
    with pytest.raises(UsageError):
        tasks.plan_tasks([bad] if bad else [])


def test_judge_spec():
    assert tasks.parse_judge("none") is None
    assert tasks.parse_judge("http://localhost:8000/v1#Qwen/Qwen3-32B") == ("http://localhost:8000/v1", "Qwen/Qwen3-32B")
    for bad in ["gpt-4o", "http://x", "ftp://x#m", "http://x#"]:
        with pytest.raises(UsageError):
            tasks.parse_judge(bad)


def test_every_shipped_override_has_a_yaml_a_scorer_and_a_process_function():
    from stages.eval.lmms_runner import PACKAGE_TASK_DIR

    yamls = {p.stem for p in PACKAGE_TASK_DIR.glob("prism_*.yaml")}
    overrides = {t for b in tasks.BENCHMARKS.values() for t in b.override_tasks}
    assert yamls == overrides == set(tasks.SCORERS)
    for name in overrides:
        text = (PACKAGE_TASK_DIR / f"{name}.yaml").read_text()
        assert f"task: {name}\n" in text and f"utils.process_{name}\n" in text
        assert hasattr(task_utils, f"process_{name}")


def score(task, doc, answer):
    return task_utils.__dict__[f"process_{task}"](doc, [GOOD.format(answer)])["acc"]


def test_mathvista_multi_choice_by_letter_or_text_and_free_form_numbers():
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": ["3", "5", "7"], "answer": "5"}
    assert score("prism_mathvista_testmini", mc, "B") == 1.0
    assert score("prism_mathvista_testmini", mc, "5") == 1.0
    assert score("prism_mathvista_testmini", mc, "C") == 0.0
    free = {"question_type": "free_form", "answer_type": "float", "choices": None, "answer": "1.5", "precision": 1}
    assert score("prism_mathvista_testmini", free, "1.50") == 1.0
    assert score("prism_mathvista_testmini", free, "2") == 0.0
    assert "Options:\nA. 3\nB. 5" in task_utils.mathvista_doc_to_text(dict(mc, question="Which?"))


def test_mathvision_letters_and_latex_values():
    assert score("prism_mathvision_testmini", {"options": ["1", "2", "3", "4", "5"], "answer": "D"}, "(D)") == 1.0
    assert score("prism_mathvision_testmini", {"options": ["1", "2", "3", "4", "5"], "answer": "D"}, "A") == 0.0
    assert score("prism_mathvision_testmini", {"options": [], "answer": "0.5"}, r"\frac{1}{2}") == 1.0


def test_mathverse_options_from_the_question_text():
    doc = {"question_type": "multi-choice", "answer": "B",
           "query_wo": "Find x.\nChoices:\nA:30\nB:45\nC:60\nD:90", "question": "Find x."}
    assert score("prism_mathverse_testmini", doc, "B") == 1.0
    assert score("prism_mathverse_testmini", doc, "45") == 1.0
    assert score("prism_mathverse_testmini", doc, "60") == 0.0
    assert score("prism_mathverse_testmini", {"question_type": "free-form", "answer": "2\\sqrt{3}"}, "2\\sqrt{3}") == 1.0


def test_wemath_option_letters():
    doc = {"question": "Which?", "option": "A. 2; B. 3; C. 4; D. 5", "answer": "C"}
    assert score("prism_wemath_testmini", doc, "C") == 1.0
    assert score("prism_wemath_testmini", doc, "4") == 1.0
    assert score("prism_wemath_testmini", doc, "A") == 0.0


def test_mmmu_choice_open_and_pro_vision():
    mc = {"question_type": "multiple-choice", "options": "['red', 'green', 'blue']", "answer": "C",
          "question": "<image 1> colour?"}
    assert score("prism_mmmu_val", mc, "C") == 1.0
    assert score("prism_mmmu_val", mc, "blue") == 1.0
    assert score("prism_mmmu_val", mc, "A") == 0.0
    assert task_utils.mmmu_image_keys(dict(mc, image_1=object(), image_2=None)) == ["image_1"]
    open_q = {"question_type": "open", "options": "[]", "answer": "['12', '12.0']", "question": "How many?"}
    assert score("prism_mmmu_val", open_q, "12") == 1.0
    std = {"options": str([str(i) for i in range(10)]), "answer": "J", "question": "Pick"}
    assert score("prism_mmmu_pro_standard", std, "J") == 1.0
    assert score("prism_mmmu_pro_vision", {"answer": "H", "image": None}, "H") == 1.0
    assert score("prism_mmmu_pro_vision", {"answer": "H", "image": None}, "B") == 0.0


def test_hallusion_yes_no_rule():
    assert score("prism_hallusion_bench_image", {"gt_answer": "1"}, "Yes.") == 1.0
    assert score("prism_hallusion_bench_image", {"gt_answer": "0"}, "No, it is not") == 1.0
    assert score("prism_hallusion_bench_image", {"gt_answer": "1"}, "No") == 0.0
    assert score("prism_hallusion_bench_image", {"gt_answer": "1"}, "maybe") == 0.0
    assert tasks.yes_no("yes and no") is None


def test_format_is_reported_apart_from_accuracy():
    doc = {"options": ["1", "2"], "answer": "B"}
    broken = task_utils.process_prism_mathvision_testmini(doc, ["the answer is B"])
    assert broken == {"acc": 1.0, "format": 0.0}  # lenient extraction without <answer>, format failed
    assert task_utils.process_prism_mathvision_testmini(doc, [GOOD.format("B")]) == {"acc": 1.0, "format": 1.0}


def test_options_in_text():
    assert tasks.options_in_text("Q\nA. 1\nB. 2\n(C) 3") == ["1", "2", "3"]
    assert tasks.options_in_text("no options here") == []


def test_synth_scoring_separates_perception_from_reasoning():
    from stages.common.world.synth import load, oracle_demo
    from stages.common.evaluation import synth as synth_eval

    sample = load("synth:test:1")[0]
    demo = oracle_demo(sample)
    right = synth_eval.score_synth(sample, GOOD.replace("- a chart", demo.caption).format(demo.answer))
    assert right["acc"] == 1.0 and right["caption_f1"] == 1.0 and synth_eval.error_kind(right) == "right"
    wrong_reasoning = synth_eval.score_synth(sample, GOOD.replace("- a chart", demo.caption).format("zzz"))
    assert synth_eval.error_kind(wrong_reasoning) == "reasoning"
    wrong_caption = synth_eval.score_synth(sample, GOOD.format("zzz"))
    assert synth_eval.error_kind(wrong_caption) == "perception"
    summary = synth_eval.summarize([right, wrong_reasoning, wrong_caption])
    assert summary["n"] == 3 and summary["value"] == pytest.approx(1 / 3)
    assert summary["extra"]["perception_errors"] == pytest.approx(1 / 3)
    assert summary["stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5, rel=1e-6)


def write_results(directory, ref, values):
    directory.mkdir(parents=True)
    tasks_ = {k: {"metric": "acc", "value": v, "n": 10, "stderr": 0.0} for k, v in values.items()}
    (directory / "results.json").write_text(json.dumps({"checkpoint": {"ref": ref}, "tasks": tasks_}))


def test_compare_table_and_markdown(tmp_path):
    write_results(tmp_path / "a", "out/sft", {"synth": 0.5, "mmmu": 0.25, "mathvista": 0.75})
    write_results(tmp_path / "b", "out/rl", {"mathvista": 0.8, "mmmu": 0.4, "synth": 0.9})
    write_results(tmp_path / "c", "out/x", {"mathvista": 0.1})
    md = compare.show([f"{tmp_path / 'a'},{tmp_path / 'b'}", str(tmp_path / "c")], str(tmp_path / "t.md"))
    assert (tmp_path / "t.md").read_text() == md
    lines = md.splitlines()
    assert lines[0] == "| checkpoint | mathvista | mmmu | synth | avg |"
    assert lines[2] == "| sft | 75.0 ± 0.0 (n=10) | 25.0 ± 0.0 (n=10) | 50.0 ± 0.0 (n=10) | 50.0 |"
    assert lines[3] == "| rl | 80.0 ± 0.0 (n=10) | 40.0 ± 0.0 (n=10) | 90.0 ± 0.0 (n=10) | 70.0 |"
    assert lines[4] == "| x | 10.0 ± 0.0 (n=10) | - | - | - |"


def test_compare_avg_is_the_papers_average_with_stderr_and_n_over_its_benchmarks():
    """With only the paper's benchmarks as columns, avg is results.json's paper_average as the paper reports it
    (value, standard error, rows); with another column (synth) it stays the plain mean; a missing column is -."""
    results = {"tasks": {"mathvista": {"value": 0.5}, "mmmu": {"value": 0.25}, "synth": {"value": 0.9}},
               "paper_average": {"value": 0.375, "stderr": 0.05, "n": 300, "benchmarks": ["mathvista", "mmmu"],
                                 "complete": False}}
    assert compare.average_cell(results, ["mathvista", "mmmu"]) == "37.5 ± 5.0 (n=300)"
    assert compare.average_cell(results, ["mathvista", "mmmu", "synth"]) == 55.0
    assert compare.average_cell(results, ["mathvista", "mathverse"]) is None


def test_compare_shows_synth_perception_when_the_evals_have_it(tmp_path):
    write_results(tmp_path / "a", "out/base", {"synth": 0.5})
    write_results(tmp_path / "b", "out/sft", {"synth": 0.4})
    write_results(tmp_path / "c", "out/x", {"mathvista": 0.1})
    for name, f1 in (("a", 0.95), ("b", 0.7)):
        r = json.loads((tmp_path / name / "results.json").read_text())
        r["tasks"]["synth"]["extra"] = {"caption_f1": f1, "perception_errors": 0.1, "reasoning_errors": 0.4,
                                        "format": 1.0}
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    lines = compare.show([str(tmp_path / d) for d in "abc"]).splitlines()
    at = lines.index("| checkpoint | caption F1 | perception errors | reasoning errors | format |")
    assert lines[at + 2:at + 5] == ["| base | 95.0 | 10.0 | 40.0 | 100.0 |", "| sft | 70.0 | 10.0 | 40.0 | 100.0 |",
                                    "| x | - | - | - | - |"]
    assert "caption F1" not in compare.show([str(tmp_path / "c")])


def test_compare_labels_are_short_but_distinct():
    assert compare.short_labels(["/home/me/runs/a/rl", "/home/me/runs/b/rl", "/scratch/out/sft", "tiny",
                                 "Qwen/Qwen3-VL-4B-Instruct"]) == ["a/rl", "b/rl", "sft", "tiny", "Qwen3-VL-4B-Instruct"]
    assert compare.short_labels(["/x/rl", "/x/rl"]) == ["/x/rl", "/x/rl"]  # the same directory twice


def test_compare_refuses_non_eval_directories(tmp_path):
    from stages.common.contract.errors import PrismError

    with pytest.raises(PrismError, match="no results.json"):
        compare.show([str(tmp_path)])
    with pytest.raises(PrismError, match="not a directory"):
        compare.show([str(tmp_path / "missing")])


# ---- paired differences (prism eval --compare): hand-made per-problem results

def test_paired_bootstrap_excludes_zero_when_one_row_wins_everywhere_it_differs():
    b = [0.0] * 30 + [1.0] * 70          # the reference: wrong on the first 30 of 100 problems
    a = [1.0] * 100                      # right everywhere
    got = compare.paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert got["diff"] == pytest.approx(0.30) and got["seeds"] == 1 and got["problems"] == 100
    assert 0.15 < got["low"] < 0.30 < got["high"] < 0.45 and compare.resolved(got)
    assert compare.wins_losses(a, b) == (30, 0)


def test_paired_bootstrap_contains_zero_when_wins_and_losses_balance():
    a = [1.0] * 20 + [0.0] * 20 + [1.0] * 60
    b = [0.0] * 20 + [1.0] * 20 + [1.0] * 60
    got = compare.paired_bootstrap(a, b, n_boot=2000, seed=0)
    assert got["diff"] == 0.0 and got["low"] < 0 < got["high"] and not compare.resolved(got)
    assert compare.wins_losses(a, b) == (20, 20)
    assert compare.paired_bootstrap(a, b, n_boot=2000, seed=0) == got   # seeded: the same interval again


def test_paired_bootstrap_resamples_seeds_as_well_as_problems():
    """Two seeds that disagree (+50 and -50 points on the same 100 problems): over problems alone each seed is
    resolved; with the seeds resampled the interval must reach both seeds' values, across zero."""
    plus = ([1.0] * 50 + [0.0] * 50, [0.0] * 100)
    minus = ([0.0] * 100, [1.0] * 50 + [0.0] * 50)
    assert compare.resolved(compare.paired_bootstrap(*plus, n_boot=1000))
    got = compare.paired_bootstrap([plus[0], minus[0]], [plus[1], minus[1]], n_boot=4000, seed=1)
    assert got["diff"] == 0.0 and got["seeds"] == 2
    assert got["low"] < -0.4 and got["high"] > 0.4          # a quarter of the replicates draw one seed twice
    assert compare.wins_losses([plus[0], minus[0]], [plus[1], minus[1]]) == (50, 50)


def test_paired_bootstrap_weights_give_a_ratio_of_sums_and_bad_shapes_are_refused():
    from stages.common.contract.errors import PrismError

    recall_a, recall_b, greens = [1.0, 0.5, 0.0], [0.0, 0.5, 0.0], [1, 2, 0]   # per-problem recall, denominators
    got = compare.paired_bootstrap(recall_a, recall_b, n_boot=200, weights=greens)
    assert got["diff"] == pytest.approx((1 * 1 + 2 * 0.5 - 1 * 0 - 2 * 0.5) / 3)   # 2/3 - 1/3 of the greens
    with pytest.raises(PrismError, match="one shape"):
        compare.paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(PrismError, match="sum to zero"):
        compare.paired_bootstrap([1.0], [0.0], weights=[0])
    with pytest.raises(PrismError, match="same problems"):
        compare.wins_losses([1, 0], [1, 0, 1])


def write_samples(directory, ref, scores, task="synth"):
    write_results(directory, ref, {task: sum(scores.values()) / len(scores)})
    (directory / "samples").mkdir()
    (directory / "samples" / f"{task}.jsonl").write_text(
        "".join(json.dumps({"id": k, "acc": v, "response": "x"}) + "\n" for k, v in scores.items()))


def test_compare_pairs_rows_problem_by_problem_over_seeds(tmp_path):
    ids = [f"p{i}" for i in range(40)]
    ref = {i: 1.0 if n < 20 else 0.0 for n, i in enumerate(ids)}                  # right on p0-p19
    better = {i: 1.0 if n < 30 else 0.0 for n, i in enumerate(ids)}               # also p20-p29: 10 wins
    same = {i: 1.0 if 5 <= n < 25 else 0.0 for n, i in enumerate(ids)}           # 5 wins, 5 losses
    for seed in ("0", "1"):
        write_samples(tmp_path / f"s{seed}" / "sft", f"s{seed}/sft", ref)
        write_samples(tmp_path / f"s{seed}" / "prism", f"s{seed}/prism", better)
        write_samples(tmp_path / f"s{seed}" / "teacher", f"s{seed}/teacher", same)
    row = lambda name: "+".join(str(tmp_path / f"s{s}" / name) for s in "01")
    md = compare.show([row("sft"), row("prism"), row("teacher")], n_boot=2000)
    paired = [line for line in md.splitlines() if " - s0/sft (2 seeds)" in line]
    assert len(paired) == 2
    cells = [c.strip() for c in paired[0].split("|")[1:-1]]
    assert cells[1:4] == ["synth", "2 x 40", "+25.0*"] and cells[5] == "20 / 0"    # 10 wins per seed, resolved
    cells = [c.strip() for c in paired[1].split("|")[1:-1]]
    assert cells[3] == "+0.0" and cells[5] == "10 / 10"
    low, high = (float(x) for x in cells[4].strip("[]").split(","))
    assert low < 0 < high


def test_compare_refuses_rows_that_cannot_be_paired(tmp_path):
    from stages.common.contract.errors import PrismError

    write_samples(tmp_path / "a", "a", {"p1": 1.0, "p2": 0.0})
    write_samples(tmp_path / "b", "b", {"q1": 1.0, "q2": 0.0})
    write_samples(tmp_path / "c", "c", {"p1": 1.0, "p2": 1.0})
    with pytest.raises(PrismError, match="share no synth problems"):
        compare.show([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(PrismError, match="seed by seed"):
        compare.show([str(tmp_path / "a"), f"{tmp_path / 'c'}+{tmp_path / 'a'}"])
    (tmp_path / "c" / "samples" / "synth.jsonl").write_text('{"id": "p1"}\n')
    with pytest.raises(PrismError, match="line 1: no problem id or no numeric 'acc' score"):
        compare.show([str(tmp_path / "a"), str(tmp_path / "c")])
