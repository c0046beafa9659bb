"""synth drift: systematic demo errors at the chosen rates, deterministic, matched arms, wired into the spec."""

import dataclasses
from collections import Counter

import pytest

from stages.common.contract.errors import UsageError
from stages.common.world.synth import (
    DEFAULT_DRIFT,
    Drift,
    arms,
    caption_accuracy,
    caption_for,
    drifted_demo,
    load,
    parse_spec,
    with_oracle_demos,
)
from stages.common.world.synth.caption_check import mentions, scene_items
from stages.common.world.synth.drift import confused, dropped_last
from stages.common.world.synth.tasks import FAMILIES

N = 600


@pytest.fixture(scope="module")
def both():
    return arms("train", N, seed=3)


def test_arms_are_matched_problem_for_problem(both):
    clean, drifted = both
    assert len(clean) == len(drifted) == N
    for c, d in zip(clean, drifted):
        assert (c.id, c.images, c.question, c.answer, c.meta) == (d.id, d.images, d.question, d.answer, d.meta)
    scenes = lambda arm: {repr(s.meta["scene"]) for s in arm}
    assert scenes(clean) == scenes(drifted) and len(scenes(clean)) > 0.95 * N  # same distinct scenes
    assert all(s.teacher.model == "oracle" and s.teacher.answer == s.answer for s in clean)
    assert all(s.teacher.model == "oracle-drift" for s in drifted)


def test_deterministic_and_seeded(both):
    _, drifted = both
    again = arms("train", N, seed=3)[1]
    assert [dataclasses.asdict(s.teacher) for s in drifted] == [dataclasses.asdict(s.teacher) for s in again]
    other = [drifted_demo(s, DEFAULT_DRIFT, seed=4).usage["drift"] for s in drifted]
    assert other != [s.teacher.usage["drift"] for s in drifted]


def rate(drifted, habit, eligible):
    pool = [s for s in drifted if eligible(s)]
    return sum(habit in s.teacher.usage["drift"] for s in pool) / len(pool), len(pool)


def test_rates_match_what_was_asked(both):
    _, drifted = both
    has_green = lambda s: any(t["color"] == "green"
                              for t in s.meta["scene"].get("objects", s.meta["scene"].get("bars")))
    got, n = rate(drifted, "confusion", has_green)
    assert n > 150 and abs(got - DEFAULT_DRIFT.confusion_rate) < 0.1
    got, n = rate(drifted, "drop", lambda s: True)
    assert abs(got - DEFAULT_DRIFT.drop_rate) < 0.07
    got, n = rate(drifted, "off_by_one", lambda s: FAMILIES[s.task].numeric)
    assert abs(got - DEFAULT_DRIFT.off_by_one_rate) < 0.07
    # a habit is never applied where it cannot be
    assert not any("confusion" in s.teacher.usage["drift"] for s in drifted if not has_green(s))
    assert not any("off_by_one" in s.teacher.usage["drift"] for s in drifted if s.task == "larger_shape")
    # and a substantial share of answers end up wrong: this is what SFT will learn
    wrong = sum(not s.teacher.usage["answer_correct"] for s in drifted) / N
    assert 0.2 < wrong < 0.7


def test_rates_zero_is_the_clean_oracle(both):
    clean, _ = both
    none = Drift(confusion_rate=0, drop_rate=0, off_by_one_rate=0)
    for s in clean[:100]:
        d = drifted_demo(s, none)
        assert (d.caption, d.think, d.answer) == (s.teacher.caption, s.teacher.think, s.teacher.answer)


def test_errors_are_systematic(both):
    """Every caption is the scene seen through the same habits (green read as blue, the last thing missed),
    nothing else is ever wrong in it, and every step error is exactly +1 on the demonstrator's own steps."""
    clean, drifted = both
    for c, d in zip(clean, drifted):
        habits, scene = d.teacher.usage["drift"], c.meta["scene"]
        seen = confused(scene, "green", "blue") if "confusion" in habits else scene
        seen = dropped_last(seen) if "drop" in habits else seen
        assert d.teacher.caption == caption_for(seen, c.task)
        truth, named = scene_items(scene), mentions(d.teacher.caption)
        assert all(key[0] == "blue" for key in named - truth)   # the only invented colour is the confused one
        assert sum((truth - named).values()) <= sum(t["color"] == "green" for t in
                                                    scene.get("objects", scene.get("bars"))) + ("drop" in habits)
        steps = FAMILIES[c.task].solve(seen, c.meta["query"]) if d.teacher.usage["reasoned_from"] == "perceived" \
            else FAMILIES[c.task].solve(scene, c.meta["query"])
        assert d.teacher.think.startswith(steps.steps)
        bump = 1 if "off_by_one" in habits else 0
        if FAMILIES[c.task].numeric:
            assert int(d.teacher.answer) == int(steps.answer) + bump
        else:
            assert d.teacher.answer == steps.answer


def test_confusion_and_drop_on_hand_made_scenes():
    scene = {"kind": "shapes", "objects": [
        {"shape": "square", "color": "green", "size": "large", "x": 0.5, "y": 0.8},
        {"shape": "circle", "color": "red", "size": "small", "x": 0.2, "y": 0.2}]}
    assert [o["color"] for o in confused(scene, "green", "blue")["objects"]] == ["blue", "red"]
    assert [o["shape"] for o in dropped_last(scene)["objects"]] == ["circle"]  # the bottom one goes
    chart = {"kind": "chart", "max_value": 8, "bars": [{"color": "green", "value": 3}, {"color": "red", "value": 5}]}
    assert dropped_last(chart)["bars"] == [{"color": "green", "value": 3}]


def test_captions_drop_f1_only_where_drifted(both):
    clean, drifted = both
    f1 = [caption_accuracy(d.teacher.caption, c)["f1"] for c, d in zip(clean, drifted)]
    caption_habits = [bool({"confusion", "drop"} & set(d.teacher.usage["drift"])) for d in drifted]
    assert all(f == 1.0 for f, h in zip(f1, caption_habits) if not h)
    assert all(f < 1.0 for f, h in zip(f1, caption_habits) if h)


def test_spec_drift_part():
    assert parse_spec("synth:train:20:drift").drift is True
    assert parse_spec("synth:train:20").drift is False
    with pytest.raises(UsageError):
        parse_spec("synth:train:drift:drift")
    got = load("synth:train:40:drift")
    assert all(s.teacher is not None and s.teacher.model == "oracle-drift" for s in got)
    assert Counter(h for s in got for h in s.teacher.usage["drift"])  # some habit fired
    assert [s.id for s in got] == [s.id for s in load("synth:train:40")]


def test_two_way_swap_keeps_the_teachers_words_and_shows_only_against_the_image():
    """:drift-swap (docs/miniature.md's "drift only in the image"): green and blue swapped both ways in half the
    demos that show either, nothing else; its captions use the clean captions' colour words and line counts
    (a text-only discriminator has nothing to go on), yet name the wrong colours."""
    scene = {"kind": "shapes", "objects": [
        {"shape": "square", "color": "green", "size": "large", "x": 0.5, "y": 0.8},
        {"shape": "circle", "color": "blue", "size": "small", "x": 0.2, "y": 0.2},
        {"shape": "circle", "color": "red", "size": "small", "x": 0.8, "y": 0.2}]}
    assert [o["color"] for o in confused(scene, "green", "blue", both_ways=True)["objects"]] == ["blue", "green", "red"]
    assert [o["color"] for o in confused(scene, "green", "blue")["objects"]] == ["blue", "blue", "red"]
    assert parse_spec("synth:train:20:drift-swap").drift and parse_spec("synth:train:20:drift-swap").drift_kind == "drift-swap"
    clean, swapped = with_oracle_demos(load("synth:train:400")), load("synth:train:400:drift-swap")
    assert [s.id for s in clean] == [s.id for s in swapped]
    assert {h for s in swapped for h in s.teacher.usage["drift"]} == {"confusion"}
    hit = [(c, d) for c, d in zip(clean, swapped) if d.teacher.usage["drift"]]
    shows = [c for c in clean if any(t["color"] in ("green", "blue") for t in
                                     c.meta["scene"].get("objects", c.meta["scene"].get("bars", [])))]
    assert 0.4 < len(hit) / len(shows) < 0.6
    colours = lambda samples: Counter(w for s in samples for w in s.teacher.caption.split() if w in ("green", "blue"))
    assert sum(colours(c for c, _ in hit).values()) == sum(colours(d for _, d in hit).values())
    assert colours(clean)["green"] > 0 and colours(swapped)["green"] > 0.5 * colours(clean)["green"]  # still says green
    for c, d in hit:
        assert len(c.teacher.caption.splitlines()) == len(d.teacher.caption.splitlines())
        # wrong against the image, unless the swap maps the scene onto itself (a green and a blue twin)
        assert (caption_accuracy(d.teacher.caption, c)["f1"] < 1.0
                or mentions(d.teacher.caption) == mentions(c.teacher.caption))
    assert sum(caption_accuracy(d.teacher.caption, c)["f1"] < 1.0 for c, d in hit) > 0.8 * len(hit)


def test_the_runs_seed_reaches_synths_problems_and_drift():
    """load_sources (what sft, align and rl read --data through) draws synth with the run's seed: another seed
    trains on other problems with another realisation of the drift; the same seed on the same ones; a spec's
    own :seedK wins. Before this, every seed of the ablation trained on seed 0's problems and demos."""
    from stages.common.data.formats import load_sources

    def demos(spec, seed):
        (src,) = load_sources([spec], seed=seed)
        return [(s.id, s.teacher.caption, s.teacher.think, s.teacher.answer) for s in src.samples]

    s0, s1 = demos("synth:train:40:drift", 0), demos("synth:train:40:drift", 1)
    assert s0 == demos("synth:train:40:drift", 0)
    assert not {i for i, *_ in s0} & {i for i, *_ in s1}      # other problems (ids carry the seed)
    assert s1 == [(s.id, s.teacher.caption, s.teacher.think, s.teacher.answer)
                  for s in load("synth:train:40:drift", seed=1)]
    assert demos("synth:train:40:drift:seed0", 1) == s0        # a pinned spec stays reproducible
    # the drift's realisation follows the seed too: on seed 1's problems, seed 1's habits, not seed 0's
    habits = lambda seed: [h for s in load("synth:train:40:drift", seed=seed) for h in s.teacher.usage["drift"]]
    assert habits(1) != habits(0)


def test_stages_pass_their_seed_to_their_data():
    """sft, align and rl hand cfg.seed to load_sources (the seed fix above is only as good as its callers)."""
    import inspect

    from stages.align import run as align_run
    from stages.rl import run as rl_run
    from stages.sft import run as sft_run

    assert "load_mixture(cfg.data, cfg.seed)" in inspect.getsource(sft_run.run)
    assert "load_sources(specs, seed=seed)" in inspect.getsource(sft_run.load_mixture)
    assert "load_demonstrations(cfg.data, cfg.seed)" in inspect.getsource(align_run)
    assert "seed=seed" in inspect.getsource(align_run.load_demonstrations)
    assert "cfg.max_prompt_chars, cfg.seed)" in inspect.getsource(rl_run)
    assert "seed=seed" in inspect.getsource(rl_run.load_prompts)
    ids = lambda seed: {s.id for s in rl_run.load_prompts(["synth:train:12"], seed=seed)[0]}
    assert ids(2) != ids(0)
    assert {s.id for s in sft_run.load_mixture(["synth:train:12:drift"], 2).samples} == ids(2)
    assert {s.id for s in align_run.load_demonstrations(["synth:train:12"], 2)[0]} == ids(2)


def test_bad_drift_settings():
    s = load("synth:train:1")[0]
    with pytest.raises(UsageError, match="confusion_rate"):
        drifted_demo(s, Drift(confusion_rate=1.5))
    with pytest.raises(UsageError, match="confuse_to"):
        drifted_demo(s, Drift(confuse_to="mauve"))
    with pytest.raises(UsageError, match="differ"):
        drifted_demo(s, Drift(confuse_to="green"))
