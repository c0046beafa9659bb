"""Every accepted source format becomes Samples; bad rows are reported by position."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.samples import Sample, Teacher, sample_to_row, write_shards
from stages.common.data.formats import load_samples, parse_mixture
from stages.common.world.synth import load as synth_load


@pytest.fixture(scope="module")
def synth():
    return synth_load("synth:train:4")


def test_synth_spec(synth):
    samples, problems = load_samples("synth:train:4")
    assert [s.id for s in samples] == [s.id for s in synth] and problems == []


def test_sample_parquet_and_jsonl(tmp_path, synth):
    synth[0].teacher = Teacher("c", "t", "a", model="m")
    write_shards(synth, tmp_path / "shards")
    got, problems = load_samples(str(tmp_path / "shards" / "data-00000.parquet"))
    assert [s.id for s in got] == [s.id for s in synth] and got[0].images == synth[0].images
    assert got[0].teacher.caption == "c" and problems == []
    # jsonl: base64 images, a path relative to the file, one broken line, one row without a question
    import base64

    (tmp_path / "img.png").write_bytes(synth[1].images[0])
    lines = [json.dumps({"id": "a", "question": "q?", "answer": "1",
                         "images": ["data:image/png;base64," + base64.b64encode(synth[0].images[0]).decode()]}),
             json.dumps({"id": "b", "question": "q2", "images": ["img.png"], "choices": ["x", "y"]}),
             "{not json",
             json.dumps({"id": "c", "images": []}),
             json.dumps({"id": "d", "question": "q4", "images": ["missing.png"]})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    got, problems = load_samples(str(tmp_path / "d.jsonl"))
    assert [s.id for s in got] == ["a", "b"]
    assert got[0].images == synth[0].images and got[1].images == synth[1].images and got[1].choices == ["x", "y"]
    assert len(problems) == 3
    assert "line 3" in problems[0] and "line 4: no question" in problems[1] and "line 5" in problems[2]
    assert "missing.png" in problems[2]
    with pytest.raises(PrismError, match="3 malformed row"):
        load_samples(str(tmp_path / "d.jsonl"), strict=True)


def test_sharegpt_json(tmp_path, synth):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.png").write_bytes(synth[0].images[0])
    data = [
        {"messages": [{"role": "user", "content": "<image>How many circles?"},
                      {"role": "assistant", "content": "<caption>c</caption><think>t</think><answer>3</answer>"}],
         "images": ["imgs/0.png"]},
        {"conversations": [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "red"}],
         "images": ["imgs/nope.png"]},
        {"messages": [{"role": "user", "content": "<image><image>two?"}, {"role": "assistant", "content": "x"}],
         "images": ["imgs/0.png"]},
        {"conversations": [{"from": "human", "value": "<image>Which?"}, {"from": "gpt", "value": "B"}],
         "images": ["imgs/0.png"], "answer": "B"},
    ]
    (tmp_path / "sft.json").write_text(json.dumps(data))
    got, problems = load_samples(str(tmp_path / "sft.json"))
    assert [s.id for s in got] == ["sft-0", "sft-3"]
    assert got[0].question == "How many circles?" and got[0].answer == "3" and got[0].images == synth[0].images
    assert got[0].conversation[1]["role"] == "assistant" and got[1].answer == "B"
    assert problems[0].endswith("row 1: image 'imgs/nope.png' not found")
    assert "row 2: 2 <image> placeholder(s) for 1 image(s)" in problems[1]


def test_verl_parquet(tmp_path, synth):
    rows = [{"data_source": "geo3k", "prompt": [{"role": "user", "content": "<image>Find x."}],
             "images": [{"bytes": synth[0].images[0], "path": None}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": "5"},
             "extra_info": {"split": "train", "index": 7, "question": "Find x."}},
            {"data_source": "geo3k", "prompt": [{"role": "system", "content": "s"}],
             "images": [], "ability": "math", "reward_model": {"style": "rule", "ground_truth": "1"},
             "extra_info": {"split": "train", "index": 8}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rl.parquet")
    got, problems = load_samples(str(tmp_path / "rl.parquet"))
    assert len(got) == 1 and got[0].id == "geo3k-train-7" and got[0].answer == "5"
    assert got[0].question == "Find x." and got[0].images == synth[0].images
    assert problems == [f"{tmp_path / 'rl.parquet'} row 1: prompt has no user message"]


def test_hf_datasets_folder(tmp_path, synth):
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["a?", "b?"], "answer": ["1", "2"],
                                     "image": [{"bytes": synth[0].images[0], "path": None},
                                               {"bytes": synth[1].images[0], "path": None}]},
                                    features=datasets.Features({"question": datasets.Value("string"),
                                                                "answer": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "hf"))
    got, problems = load_samples(str(tmp_path / "hf"))
    assert [s.question for s in got] == ["a?", "b?"] and got[1].images == synth[1].images and problems == []


def test_prism_checkpoint_dir(tmp_path, synth):
    from stages.common.contract.checkpoint import open_output

    run = open_output(str(tmp_path / "cur"), "curate", {}, [])
    write_shards(synth, run.path / "data")
    run.finalize()
    got, _ = load_samples(str(tmp_path / "cur"))
    assert [s.id for s in got] == [s.id for s in synth]
    sft = open_output(str(tmp_path / "sft"), "sft", {}, [])
    sft.finalize()
    with pytest.raises(PrismError, match="'sft' checkpoint"):
        load_samples(str(tmp_path / "sft"))


def test_duplicates_and_missing(tmp_path):
    rows = [sample_to_row(Sample(id="x", images=[], question="q")), sample_to_row(Sample(id="x", images=[], question="r"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    got, problems = load_samples(str(tmp_path / "d.parquet"))
    assert len(got) == 1 and "duplicate id 'x'" in problems[0]
    with pytest.raises(PrismError, match="does not exist"):
        load_samples(str(tmp_path / "nope.parquet"))


def test_parse_mixture(tmp_path):
    (tmp_path / "a:b.parquet").write_bytes(b"")
    assert parse_mixture(["a.parquet:0.9", "synth:train:1000", "synth:train:2000:0.1", "b.json", "synth:0.5",
                          str(tmp_path / "a:b.parquet")]) == [
        # no weight given -> None: the stage concatenates such sources as they are
        ("a.parquet", 0.9), ("synth:train:1000", None), ("synth:train:2000", 0.1), ("b.json", None),
        ("synth", 0.5), (str(tmp_path / "a:b.parquet"), None)]
    with pytest.raises(UsageError):
        parse_mixture(["a.parquet:0"])


def test_a_source_given_twice_is_refused(tmp_path, monkeypatch):
    """A line repeated in a launch script would train on that source twice, unsaid."""
    with pytest.raises(UsageError, match=r"^--data synth:train:64 is given twice$"):
        parse_mixture(["synth:train:64", "b.json", "synth:train:64:0.5"])
    (tmp_path / "a.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"given twice \(as a.jsonl\)"):
        parse_mixture(["a.jsonl", str(tmp_path / "a.jsonl")])
    assert parse_mixture(["synth:train:64", "synth:val:64"]) == [("synth:train:64", None), ("synth:val:64", None)]
