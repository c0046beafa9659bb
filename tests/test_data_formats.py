"""Data users hold (issue 19): the reader registry and the formats added to it: HF imagefolder
(metadata.jsonl + file_name), parquet with image/problem/solution columns, hub snapshot folders
(data/ subfolder), globs, .arrow files, hub dataset ids from the local cache, LLaMA-Factory
dataset_info.json column mappings; and the count of dropped rows every stage reports."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from stages.common.contract.errors import PrismError
from stages.common.data import formats
from stages.common.data.formats import READERS, dropped_report, load_samples, load_sources


def _png(color=(10, 200, 30), mode="RGB", size=(12, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _hub_rows(n: int, start: int = 0) -> list[dict]:
    """Rows as hub datasets ship them: image as {bytes, path}, problem, solution."""
    return [{"image": {"bytes": _png((i * 20 % 255, 0, 0)), "path": None}, "problem": f"what is {i}+1?",
             "solution": str(i + 1)} for i in range(start, start + n)]


def test_registry_is_one_table_with_a_reader_per_format():
    assert {"parquet", "jsonl", "json", "arrow", "snapshot", "hf datasets folder", "llamafactory",
            "prism checkpoint", "folder"} <= set(READERS)
    assert all(callable(r.detect) and callable(r.read) and r.describe for r in READERS.values())


def test_every_source_kind_is_a_row_and_a_new_row_is_read(tmp_path, monkeypatch):
    """Specs that are not paths (synth, DIR#name, globs, hub ids) are rows too, after the file rows; a row added
    to the table is all load_samples needs."""
    from stages.common.data import formats

    names = READERS.names()
    assert names[-4:] == ["synth", "llamafactory entry", "glob", "hub dataset"]
    assert READERS.get("synth").detect("synth:train:4") and not READERS.get("synth").detect(str(tmp_path))
    (tmp_path / "synth:train:4").mkdir()   # a path that exists is read as a path, never as a named spec
    assert not READERS.get("synth").detect(str(tmp_path / "synth:train:4"))
    row = formats.on_path(lambda p: p.suffix == ".qa", lambda p: ([formats.sample_from_record(
        {"question": q, "answer": a}, default_id=q) for q, a in (line.split("=") for line in p.read_text().split())],
        []), "*.qa")
    monkeypatch.setitem(READERS._entries, "qa", row)
    (tmp_path / "x.qa").write_text("1+1=2 2+2=4")
    samples, problems = load_samples(str(tmp_path / "x.qa"))
    assert [(s.question, s.answer) for s in samples] == [("1+1", "2"), ("2+2", "4")] and problems == []


def test_hf_imagefolder_loads_its_images(tmp_path):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png((i * 50, 0, 0)))
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "question": f"q{i}?", "answer": str(i)}) + "\n" for i in range(3)))
    for spec in (folder, folder / "metadata.jsonl"):
        samples, problems = load_samples(str(spec))
        assert problems == [] and len(samples) == 3
        assert [s.images[0] for s in samples] == [(folder / f"{i}.png").read_bytes() for i in range(3)]


def test_imagefolder_with_split_folders_reads_train(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / "ds" / split).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "ds" / split / f"{i}.png").write_bytes(_png((i * 50, 0, 0)))
        (tmp_path / "ds" / split / "metadata.jsonl").write_text("".join(
            json.dumps({"file_name": f"{i}.png", "question": f"{split} q{i}?", "answer": str(i)}) + "\n"
            for i in range(n)))
    samples, problems = load_samples(str(tmp_path / "ds"))
    assert problems == [] and [s.question for s in samples] == ["train q0?", "train q1?", "train q2?"]
    assert all(len(s.images) == 1 for s in samples)


def test_parquet_with_image_problem_solution_columns(tmp_path):
    path = _write_parquet(tmp_path / "train.parquet", _hub_rows(4))
    samples, problems = load_samples(str(path))
    assert problems == [] and [s.question for s in samples] == [f"what is {i}+1?" for i in range(4)]
    assert [s.answer for s in samples] == ["1", "2", "3", "4"] and all(len(s.images) == 1 for s in samples)


def test_parquet_without_a_question_column_is_one_clear_error(tmp_path):
    path = _write_parquet(tmp_path / "x.parquet", [{"foo": 1, "bar": "b"}])
    with pytest.raises(PrismError, match="no question column .*has foo, bar"):
        load_samples(str(path))


def _snapshot(root: Path) -> Path:
    _write_parquet(root / "data" / "train-00000-of-00001.parquet", _hub_rows(3))
    _write_parquet(root / "data" / "test-00000-of-00001.parquet", _hub_rows(2, start=10))
    (root / "README.md").write_text("# a dataset card\n")
    return root


def test_snapshot_folder_reads_data_subfolder_train_split(tmp_path):
    samples, problems = load_samples(str(_snapshot(tmp_path / "snap")))
    assert problems == [] and len(samples) == 3 and samples[0].question == "what is 0+1?"


def test_glob_of_files(tmp_path):
    _snapshot(tmp_path / "snap")
    samples, _ = load_samples(str(tmp_path / "snap" / "data" / "*.parquet"))
    assert len(samples) == 5
    with pytest.raises(PrismError, match="matches no file"):
        load_samples(str(tmp_path / "nothing-*.parquet"))


def test_arrow_file_written_by_datasets(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"problem": ["a?", "b?"], "solution": ["A", "B"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))[0]
    samples, problems = load_samples(str(arrow))
    assert problems == [] and [(s.question, s.answer) for s in samples] == [("a?", "A"), ("b?", "B")]


def _hub_cache(cache: Path, repo: str) -> None:
    """A dataset snapshot laid out as huggingface_hub caches it (what an earlier download left)."""
    base = cache / f"datasets--{repo.replace('/', '--')}"
    commit = "0" * 40
    _snapshot(base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)


def test_hub_dataset_id_from_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    _hub_cache(tmp_path / "hub", "lab/tiny-vqa")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples, _ = load_samples("lab/tiny-vqa")
    assert len(samples) == 3
    samples, _ = load_samples("lab/tiny-vqa:test")
    assert [s.answer for s in samples] == ["11", "12"]
    with pytest.raises(PrismError, match="hub dataset lab/tiny-vqa has no 'validation' split .*test, train"):
        load_samples("lab/tiny-vqa:validation")
    with pytest.raises(PrismError, match="lab/not-cached is not a local path; as a hub dataset: .*not in the local "
                                         "hub cache and HF_HUB_OFFLINE is set"):
        load_samples("lab/not-cached")


def test_hub_dataset_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    with pytest.raises(PrismError, match="cannot reach http://127.0.0.1:9 .*not in the local cache"):
        load_samples("lab/not-cached")


def _llamafactory(tmp_path: Path) -> Path:
    (tmp_path / "img.png").write_bytes(_png())
    (tmp_path / "chat.json").write_text(json.dumps([{
        "conv": [{"speaker": "me", "text": "<image>How many?"}, {"speaker": "bot", "text": "<answer>3</answer>"}],
        "pics": ["img.png"]}]))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "<image>Name the colour.", "input": "",
                                                       "output": "<answer>green</answer>", "images": ["img.png"]}]))
    _write_parquet(tmp_path / "table.parquet", [{"Q": "2+2?", "A": "4", "uid": "x1"}])
    info = {
        "chat": {"file_name": "chat.json", "formatting": "sharegpt",
                 "columns": {"messages": "conv", "images": "pics"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
        "alpaca": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                                                           "response": "output", "images": "images"}},
        "table": {"file_name": "table.parquet", "columns": {"question": "Q", "answer": "A", "id": "uid"}},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def test_llamafactory_dataset_info_column_mapping(tmp_path):
    root = _llamafactory(tmp_path)
    chat, _ = load_samples(f"{root}#chat")
    assert chat[0].question == "How many?" and chat[0].answer == "3" and len(chat[0].images) == 1
    assert chat[0].conversation[1] == {"role": "assistant", "content": "<answer>3</answer>"}
    alpaca, _ = load_samples(f"{root / 'dataset_info.json'}#alpaca")
    assert alpaca[0].question == "Name the colour." and alpaca[0].answer == "green"
    table, _ = load_samples(f"{root}#table")
    assert (table[0].id, table[0].question, table[0].answer) == ("x1", "2+2?", "4")
    with pytest.raises(PrismError, match="describes 3 datasets; name one"):
        load_samples(str(root / "dataset_info.json"))
    with pytest.raises(PrismError, match="no dataset 'chta'"):
        load_samples(f"{root}#chta")


def test_dropped_rows_are_counted_for_the_manifest(tmp_path, capsys):
    good = {"id": "a", "question": "q?", "answer": "1"}
    lines = [json.dumps(good), "{not json", json.dumps({"id": "b", "question": "q2?", "answer": "2",
                                                         "images": ["missing.png"]}),
             json.dumps(good), json.dumps({"id": "c", "question": "q3?", "answer": ""})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    sources = load_sources([str(tmp_path / "d.jsonl")], keep=lambda s: bool(s.answer), need="needs an answer")
    report = dropped_report(sources)[str(tmp_path / "d.jsonl")]
    assert report["malformed"] == 3 and report["filtered"] == 1 and report["filtered_because"] == "needs an answer"
    assert any("duplicate id 'a'" in e for e in sources[0].problems)
    assert "skipped 3 malformed row(s)" in capsys.readouterr().err
    assert dropped_report(load_sources(["synth:train:4"])) == {}


def test_an_image_string_too_long_for_a_path_is_a_bad_row_not_a_crash(tmp_path):
    rows = [{"id": "a", "question": "q?", "images": ["b'\\x89PNG" + "x" * 5000 + "'"]},
            {"id": "b", "question": "q?", "answer": "1"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, problems = load_samples(str(tmp_path / "d.jsonl"))
    assert [s.id for s in samples] == ["b"] and "not found" in problems[0]


# ------------------------------------------------------------------------------------ image modes

def _encode(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decoded(raw: bytes):
    from stages.common.contract.samples import Sample

    [img] = Sample(id="x", images=[raw], question="q").pil_images()
    assert img.mode == "RGB"
    return img


def test_transparent_16bit_cmyk_palette_grey_and_rotated_images_decode_as_meant():
    import numpy as np
    from PIL import Image

    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert _decoded(_encode(transparent)).getpixel((0, 0)) == (255, 255, 255)  # not black
    half = Image.new("LA", (8, 8), (0, 128))
    assert _decoded(_encode(half)).getpixel((0, 0)) == (127, 127, 127)
    deep = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert _decoded(_encode(deep)).getpixel((0, 0)) == (128, 128, 128)          # not clipped to white
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert _decoded(_encode(cmyk, "JPEG")).getpixel((0, 0))[0] > 200             # red stays red
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert _decoded(_encode(palette, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (8, 8), 90)
    assert _decoded(_encode(grey)).getpixel((0, 0)) == (90, 90, 90)
    wide = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = wide.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    assert _decoded(_encode(wide, "JPEG", exif=exif.tobytes())).size == (10, 20)


def test_json_and_jsonl_with_a_byte_order_mark(tmp_path):
    (tmp_path / "d.json").write_bytes("\ufeff".encode() + json.dumps([{"question": "a?", "answer": "1"}]).encode())
    (tmp_path / "d.jsonl").write_bytes("\ufeff".encode() + json.dumps({"question": "b?", "answer": "2"}).encode())
    assert load_samples(str(tmp_path / "d.json"))[0][0].question == "a?"
    samples, problems = load_samples(str(tmp_path / "d.jsonl"))
    assert problems == [] and samples[0].question == "b?"


def test_imagefolder_metadata_csv_keeps_text_as_written(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "metadata.csv").write_text("file_name,question,answer,id\na.png,How many?,1.50,007\n")
    [sample], problems = load_samples(str(tmp_path))
    assert problems == [] and (sample.id, sample.answer) == ("007", "1.50") and len(sample.images) == 1


def test_hub_dataset_id_prepared_in_the_datasets_cache(tmp_path, monkeypatch):
    """What `datasets.load_dataset("lab/tiny-qa")` leaves in its cache (HF_DATASETS_CACHE/lab___tiny-qa/
    default/0.0.0/<hash>/tiny-qa-train.arrow) is read offline when the hub cache has no snapshot."""
    import shutil

    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _write_parquet(tmp_path / "t.parquet", _hub_rows(3))
    datasets.load_dataset("parquet", data_files={"train": str(source)}, cache_dir=str(tmp_path / "build"))
    [built] = [p for p in (tmp_path / "build").glob("parquet/*/0.0.0/*") if p.is_dir()]
    target = tmp_path / "ds-cache" / "lab___tiny-qa" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    (target / "parquet-train.arrow").rename(target / "tiny-qa-train.arrow")
    samples, problems = load_samples("lab/tiny-qa")
    assert problems == [] and [s.answer for s in samples] == ["1", "2", "3"] and len(samples[0].images) == 1
