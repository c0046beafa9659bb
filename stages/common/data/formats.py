"""Readers for every accepted source format, all returning Samples; `load_samples(spec)` picks one.

Every kind of source goes through READERS (bottom of this module), one row per kind: detect(spec) -> bool,
read(spec, seed) -> (samples, problems); the first that detects a spec reads it. Adding a format is a reader
function, one READERS row and its test (docs/first-hour.md lists them all):

    out/curated                 a prism checkpoint directory (its data/ shards)
    data.parquet, data.jsonl    rows in the sample schema (stages/common/contract/samples.py), or any table with
    data.csv, data.arrow        question-like columns (problem/solution/image); a directory of them
    folder/metadata.jsonl       an HF imagefolder (file_name names the image)
    data.json                   LLaMA-Factory ShareGPT multimodal JSON (images by path, relative to the file)
    rl.parquet                  verl-style RL parquet (prompt, images, reward_model.ground_truth, extra_info)
    hf_folder/                  a Hugging Face datasets folder (datasets.save_to_disk)
    snapshot/data/...           a hub snapshot folder

Specs that are not paths (rows made with by_name): synth[:train:N...] (the built-in benchmark), owner/name[:split]
(a hub dataset, from the local hub cache), a glob (data/*.parquet), DIR#name or dataset_info.json#name (a
LLaMA-Factory dataset_info.json entry with its column mapping).

A malformed row never stops a load by default: it is skipped and reported by position ("data.json
row 17: image 'img/x.png' not found"); strict=True makes the first one fatal. `parse_mixture` reads
the "spec:weight" syntax stages use to mix sources ("a.parquet:0.9", "synth:train:2000:0.1").
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from stages.common.contract import hub
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.registry import Registry
from stages.common.contract.samples import Sample, Teacher, read_shards

IMAGE_TOKEN = "<image>"
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "model": "assistant"}


class BadRow(Exception):
    """One row that cannot become a Sample; the message says why (the caller adds where)."""


# --------------------------------------------------------------------------------------- dispatch

@dataclasses.dataclass(frozen=True)
class Reader:
    """One accepted kind of source: detect(spec) says whether a --data spec is of this kind; read(spec, seed)
    returns (samples, problems). Every kind is a row of READERS, tried in order: files and folders (the spec
    is an existing path), then the kinds named by their text (synth, DIR#name, a glob, a hub id)."""

    detect: Callable[[str], bool]
    read: Callable[[str, int], tuple[list[Sample], list[str]]]
    describe: str


def on_path(test: Callable[[Path], bool], read: Callable[[Path], tuple[list[Sample], list[str]]],
            describe: str) -> Reader:
    """A reader of an existing file or folder: test and read take the spec as a Path."""
    return Reader(lambda spec: _as_path(spec).exists() and test(_as_path(spec)),
                  lambda spec, seed: read(_as_path(spec)), describe)


def by_name(test: Callable[[str], bool], read: Callable[[str, int], tuple[list[Sample], list[str]]],
            describe: str) -> Reader:
    """A reader of a spec that is not a path on this machine (a path that exists always wins)."""
    return Reader(lambda spec: not _as_path(spec).exists() and test(spec), read, describe)


def _as_path(spec: str) -> Path:
    return Path(spec).expanduser()


def _suffix(*suffixes: str) -> Callable[[Path], bool]:
    return lambda p: p.is_file() and p.suffix.lower() in suffixes


def _is_prism_dir(p: Path) -> bool:
    from stages.common.contract.checkpoint import MANIFEST, RUN_MARKER

    return p.is_dir() and ((p / MANIFEST).is_file() or (p / RUN_MARKER).is_file())


def _is_hf_saved(p: Path) -> bool:
    if not p.is_dir():
        return False
    if any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
        return True
    return (p / "dataset_info.json").is_file() and not _is_llamafactory_info(p / "dataset_info.json")


def _is_snapshot(p: Path) -> bool:
    """A hub snapshot or a folder laid out like one: the data files live under data/ or split folders."""
    if not p.is_dir() or _data_files(p):
        return False
    return (p / "data").is_dir() or any((p / s).is_dir() and _data_files(p / s) for s in _SPLITS)


READERS: Registry[Reader] = Registry("data format", "--data")  # filled at the end of this module


def load_samples(spec: str, strict: bool = False, seed: int = 0) -> tuple[list[Sample], list[str]]:
    """(samples, problems) for a source spec; problems name each skipped row by position."""
    spec = str(spec).strip()
    if not spec:
        raise UsageError("an empty data source was given")
    samples, problems = read_spec(spec, seed)
    samples, dup_problems = _dedupe(samples, spec)
    problems += dup_problems
    if problems and not samples:
        # nothing usable is not a skip-and-count situation: say what is wrong with the first row
        raise PrismError(f"no usable rows in {spec}: {len(problems)} malformed row(s); first: {problems[0]}")
    if not samples:
        raise PrismError(f"data source {spec} holds no rows")
    if problems and strict:
        raise PrismError(f"{len(problems)} malformed row(s) in {spec}; first: {problems[0]}",
                         hint="fix the rows, or drop --strict to skip and count them")
    return samples, problems


def read_spec(spec: str, seed: int = 0) -> tuple[list[Sample], list[str]]:
    """A spec through the first reader of READERS that recognises it."""
    path = _as_path(spec)
    if path.is_file() and path.stat().st_size == 0:
        raise PrismError(f"data source {path} is an empty file")
    if path.is_dir() and (path / "config.json").is_file() and any(
            path.glob(g) for g in ("*.safetensors", "*.bin", "*.safetensors.index.json")):
        raise PrismError(f"data source {spec} is a model directory (config.json and weights), not data",
                         hint="give it as --ckpt; --data takes problems (a curate dir, parquet, jsonl, json ...)")
    for reader in READERS.values():
        if reader.detect(spec):
            return reader.read(spec, seed)
    if path.is_dir():
        raise PrismError(f"data source {spec} is a directory with nothing prism reads",
                         hint="expected prism.json, an HF datasets folder, a data/ folder, or *.parquet / *.jsonl / "
                              "*.json / *.arrow files")
    if path.exists():
        raise PrismError(f"data source {path}: unknown file type {path.suffix!r}",
                         hint="prism reads " + "; ".join(r.describe for r in READERS.values()))
    raise PrismError(f"data source {spec} does not exist",
                     hint="give a prism data dir, *.parquet, *.jsonl, *.arrow, ShareGPT *.json, an HF datasets "
                          "folder or hub id, a glob, dataset_info.json#name or synth[:train:N]")


def read_path(path: Path) -> tuple[list[Sample], list[str]]:
    """A file or directory through the first reader of READERS that recognises it."""
    return read_spec(str(path))


def _read_prism(path: Path, spec: str) -> tuple[list[Sample], list[str]]:
    from stages.common.contract.checkpoint import require_stage, resolve

    ckpt = require_stage(resolve(spec, role="--data"), ("curate",), role="--data")
    return read_shards(ckpt.path / "data"), []


_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv")


def _data_files(path: Path, recursive: bool = False) -> list[Path]:
    found = path.rglob("*") if recursive else path.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES
                  and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
                  and not p.name.startswith("."))


def _read_many(files: list[Path]) -> tuple[list[Sample], list[str]]:
    samples, problems = [], []
    for f in files:
        if f.stat().st_size == 0:
            problems.append(f"{f}: empty file")
            continue
        s, p = read_path(f)
        samples += s
        problems += p
    return samples, problems


def read_dir(path: Path) -> tuple[list[Sample], list[str]]:
    """A folder of data files (an HF imagefolder's metadata.jsonl among them)."""
    return _read_many(_data_files(path))


_SPLITS = ("train", "test", "validation", "val", "dev")


def _split_of(f: Path, root: Path) -> str:
    """train-00000-of-00001.parquet -> train; train/metadata.jsonl -> train; else the name's prefix."""
    prefix = f.name.split("-")[0].split(".")[0]
    folders = f.relative_to(root).parts[:-1]
    if prefix not in _SPLITS and folders and folders[0] in _SPLITS:
        return folders[0]
    return prefix


def split_files(root: Path, split: str | None, what: str, hint: str | None = None) -> list[Path]:
    """The data files under root of one split: the named one, else train when there is one, else all."""
    files = _data_files(root, recursive=True)
    splits = sorted({_split_of(f, root) for f in files})
    want = split or ("train" if "train" in splits else None)
    if want is not None:
        files = [f for f in files if _split_of(f, root) == want]
        if not files:
            raise PrismError(f"{what} has no '{want}' split (has: {', '.join(splits) or 'no data files'})", hint=hint)
    if not files:
        raise PrismError(f"{what} holds no *.parquet, *.jsonl, *.json, *.csv or *.arrow files")
    return files


def read_snapshot(path: Path, split: str | None = None) -> tuple[list[Sample], list[str]]:
    """A hub dataset snapshot (data/**/{split}-*.parquet) or an imagefolder with split folders
    (train/metadata.jsonl): train when present, unless a split is named."""
    root = path / "data" if (path / "data").is_dir() else path
    return _read_many(split_files(root, split, str(root)))


def read_glob(pattern: str) -> tuple[list[Sample], list[str]]:
    import glob

    files = [f for f in sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
             if f.is_file()]
    if not files:
        raise PrismError(f"data source {pattern}: the pattern matches no file")
    return _read_many(files)


def read_parquet(path: Path) -> tuple[list[Sample], list[str]]:
    """Sample-schema parquet, verl-style RL parquet, or any table with a question-like column
    (image/problem/solution as hub datasets ship them)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:
        raise PrismError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
    if "prompt" in names and ("reward_model" in names or "extra_info" in names):
        return read_verl_parquet(path)
    _require_question_column(path, names)
    return read_sample_parquet(path)


def read_arrow(path: Path) -> tuple[list[Sample], list[str]]:
    """An Arrow IPC stream or file (what datasets writes: data-00000-of-00001.arrow, cache-*.arrow)."""
    import pyarrow as pa

    table = None
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(path)) as source:
                table = opener(source).read_all()
            break
        except Exception:  # pyarrow raises ArrowInvalid / OSError for the other layout; try the next
            continue
    if table is None:
        raise PrismError(f"cannot read {path} as an Arrow stream or file")
    _require_question_column(path, table.column_names)
    return _collect(((f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())),
                    lambda r: sample_from_record(r, path.parent))


def read_csv(path: Path) -> tuple[list[Sample], list[str]]:
    """A CSV table with a header (an HF imagefolder's metadata.csv: file_name + columns). Every cell is
    text, so ids like 007 and answers like 1.50 keep their spelling."""
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = [{k: (v if v != "" else None) for k, v in r.items() if k is not None} for r in reader]
            names = reader.fieldnames or []
    except UnicodeDecodeError as e:
        raise PrismError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except csv.Error as e:
        raise PrismError(f"cannot read CSV file {path}: {e}") from None
    _require_question_column(path, names)
    return _collect(((f"{path} line {i + 2}", r) for i, r in enumerate(rows)),
                    lambda r: sample_from_record(r, path.parent))


def _require_question_column(path: Path, names: list[str]) -> None:
    if not any(c in names for c in _QUESTION_COLS):
        raise PrismError(f"{path} has no question column (looked for {', '.join(_QUESTION_COLS)}; has "
                         f"{', '.join(names)})", hint="rename a column, or map it in a dataset_info.json entry")


def _is_llamafactory_info(path: Path) -> bool:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and bool(info) and all(
        isinstance(v, dict) and ("file_name" in v or "hf_hub_url" in v) for v in info.values())


def _dedupe(samples: list[Sample], spec: str) -> tuple[list[Sample], list[str]]:
    seen: set[str] = set()
    out, problems = [], []
    for i, s in enumerate(samples):
        if s.id in seen:
            problems.append(f"{spec} sample {i}: duplicate id {s.id!r} (kept the first)")
            continue
        seen.add(s.id)
        out.append(s)
    return out, problems


def _collect(rows: Iterable[tuple[str, Any]], convert: Callable[[Any], Sample]) -> tuple[list[Sample], list[str]]:
    samples, problems = [], []
    for where, row in rows:
        try:
            samples.append(convert(row))
        except BadRow as e:
            problems.append(f"{where}: {e}")
    return samples, problems


# --------------------------------------------------------------------------------------- values

def image_bytes(value: Any, base_dir: Path | None = None) -> bytes:
    """Encoded image bytes from what datasets hold: bytes, {"bytes", "path"}, a path, a data URL, PIL."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise BadRow("an image is empty")
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return image_bytes(value["bytes"], base_dir)
        if value.get("path"):
            return image_bytes(str(value["path"]), base_dir)
        raise BadRow("an image entry has neither bytes nor path")
    if isinstance(value, str):
        if value.startswith(("http://", "https://", "s3://", "gs://")):
            raise BadRow(f"image {value[:80]!r} is a URL: prism reads images from files or bytes and never "
                         "downloads them; fetch them first")
        if value.startswith("data:") and ";base64," in value:
            try:
                return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
            except ValueError:
                raise BadRow("an image data URL is not valid base64") from None
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        try:
            if p.is_file():
                return p.read_bytes()
        except OSError:  # a name too long for the filesystem (base64 text, a repr of bytes): not a path
            pass
        if len(value) > 256 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", value):
            try:
                return base64.b64decode(value, validate=False)
            except ValueError:
                pass
        raise BadRow(f"image {value[:80]!r} not found")
    if hasattr(value, "save"):  # a PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise BadRow(f"an image is a {type(value).__name__}, not bytes, a path or a dict")


# Qwen-VL image processors refuse (ValueError, mid-step) an image whose long side is over 200 times its
# short side (smart_resize); such a row is dropped when its source is read, so it never reaches a step.
MAX_ASPECT_RATIO = 200


def check_image(raw: bytes, index: int = 0) -> bytes:
    """The bytes of a decodable image of a sane size, else BadRow: corrupt or truncated files and
    decompression bombs are caught when a source is read, not deep inside a training step.

    The header gives the size (no pixels are decoded); verify() walks the file's structure (PNG chunk
    CRCs: a truncated PNG fails here). Images over PIL's MAX_IMAGE_PIXELS are refused rather than
    decoded: a 20000x20000 image is 1.2 GB of RGB before the processor could downscale it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                raise BadRow(f"image {index} is {width}x{height} ({width * height:,} pixels), over the "
                             f"{limit:,}-pixel limit for decompression bombs; downscale it first")
            if min(width, height) == 0 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
                raise BadRow(f"image {index} is {width}x{height}: an aspect ratio over {MAX_ASPECT_RATIO}, which "
                             "the vision processor refuses; crop or pad it")
            img.verify()
    except BadRow:
        raise
    except Image.DecompressionBombError:
        raise BadRow(f"image {index} is too large to decode safely (over the {Image.MAX_IMAGE_PIXELS:,}-pixel "
                     f"limit for decompression bombs); downscale it first") from None
    except UnidentifiedImageError:
        raise BadRow(f"image {index} is not an image file PIL can read ({len(raw)} bytes starting "
                     f"{raw[:8]!r})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error for broken files
        detail = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise BadRow(f"image {index} is corrupt or truncated ({detail})") from None
    return raw


def _images(value: Any, base_dir: Path | None = None) -> list[bytes]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [check_image(image_bytes(v, base_dir), i) for i, v in enumerate(values)]


def _text(value: Any, name: str, required: bool = False) -> str:
    if value is None:
        if required:
            raise BadRow(f"no {name}")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise BadRow(f"{name} is a {type(value).__name__}, not text")
    if required and not value.strip():
        raise BadRow(f"{name} is empty")
    return value


def _json_field(value: Any, name: str, kind: type):
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(f"{name} is not valid JSON") from None
    if value is not None and not isinstance(value, kind):
        raise BadRow(f"{name} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _content_id(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------- sample schema

def schema_record(rec: dict) -> dict:
    """Fill the sample-schema keys a row lacks from the column names datasets commonly use
    (problem/solution/image, an imagefolder's file_name ...); rows already in the schema are unchanged."""
    rec = dict(rec)
    for key, aliases in (("question", _QUESTION_COLS), ("answer", _ANSWER_COLS), ("images", _IMAGE_COLS)):
        if rec.get(key) is not None:
            continue
        for alias in aliases:
            value = rec.get(alias)
            if value is None or (alias == "prompt" and not isinstance(value, str)):
                continue
            if key == "answer" and isinstance(value, list):
                value = value[0] if value else ""
            rec[key] = value
            break
    return rec


def sample_from_record(rec: Any, base_dir: Path | None = None, default_id: str = "") -> Sample:
    """A sample-schema dict (a parquet row or a jsonl object) -> Sample, or BadRow."""
    if not isinstance(rec, dict):
        raise BadRow(f"a row is a {type(rec).__name__}, not an object")
    rec = schema_record(rec)
    question = _text(rec.get("question"), "question", required=True)
    images = _images(rec.get("images"), base_dir)
    choices = _json_field(rec.get("choices"), "choices", list)
    if choices is not None:
        choices = [str(c) for c in choices]
    teacher = _json_field(rec.get("teacher"), "teacher", dict)
    if teacher is not None:
        missing = [k for k in ("caption", "think", "answer") if not isinstance(teacher.get(k), str)]
        if missing:
            raise BadRow(f"teacher lacks {', '.join(missing)}")
        teacher = Teacher(caption=teacher["caption"], think=teacher["think"], answer=teacher["answer"],
                          model=str(teacher.get("model") or ""), usage=dict(teacher.get("usage") or {}))
    meta = _json_field(rec.get("meta"), "meta", dict) or {}
    conversation = _json_field(rec.get("conversation"), "conversation", list)
    raw_id = rec.get("id")
    sid = str(raw_id) if raw_id not in (None, "") else default_id or _content_id(question, *images)
    return Sample(id=sid, images=images, question=question, answer=_text(rec.get("answer"), "answer"),
                  choices=choices, task=_text(rec.get("task"), "task"), source=_text(rec.get("source"), "source"),
                  teacher=teacher, meta=meta, conversation=conversation)


def read_sample_parquet(path: Path) -> tuple[list[Sample], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise PrismError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
    return _collect(((f"{path} row {i}", r) for i, r in enumerate(rows)),
                    lambda r: sample_from_record(r, path.parent))


def read_jsonl(path: Path) -> tuple[list[Sample], list[str]]:
    def rows():
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield f"{path} line {n}", _Broken(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                                      f"{e.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield f"{path} line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path} line {n}", _Broken(f"not valid JSON ({e.msg} at column {e.colno})")

    return _collect(rows(), lambda r: _unbroken(r, lambda rec: sample_from_record(rec, path.parent)))


class _Broken:
    def __init__(self, why: str):
        self.why = why


def _unbroken(row, convert):
    if isinstance(row, _Broken):
        raise BadRow(row.why)
    return convert(row)


# --------------------------------------------------------------------------------------- ShareGPT

def read_json(path: Path) -> tuple[list[Sample], list[str]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))  # -sig: a BOM from Windows tools is fine
    except UnicodeDecodeError as e:
        raise PrismError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise PrismError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise PrismError(f"{path} must hold a JSON list of records (ShareGPT or the sample schema)")
    stem = path.stem

    def convert(item):
        i, rec = item
        if isinstance(rec, dict) and ("messages" in rec or "conversations" in rec):
            return sharegpt_sample(rec, path.parent, f"{stem}-{i}")
        return sample_from_record(rec, path.parent, default_id=f"{stem}-{i}")

    return _collect(((f"{path} row {i}", (i, r)) for i, r in enumerate(data)), convert)


def sharegpt_sample(rec: dict, base_dir: Path, default_id: str) -> Sample:
    """One LLaMA-Factory ShareGPT multimodal record (messages or conversations + images)."""
    from stages.common.protocol import parse_response

    turns = rec.get("messages", rec.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise BadRow("no messages")
    conversation = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRow(f"message {j} is not an object")
        role = _ROLE.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, str):
            raise BadRow(f"message {j} has no role/from or no text content")
        conversation.append({"role": role, "content": content})
    if isinstance(rec.get("system"), str) and rec["system"] and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": rec["system"]})
    images = _images(rec.get("images", rec.get("image")), base_dir)
    placeholders = sum(t["content"].count(IMAGE_TOKEN) for t in conversation if t["role"] == "user")
    if placeholders != len(images):
        raise BadRow(f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)")
    users = [t for t in conversation if t["role"] == "user"]
    if not users:
        raise BadRow("no user message")
    question = users[0]["content"].replace(IMAGE_TOKEN, "").strip()
    if not question:
        raise BadRow("the user message has no text")
    answer = rec.get("answer")
    if not isinstance(answer, str):
        replies = [t["content"] for t in conversation if t["role"] == "assistant"]
        answer = (parse_response(replies[0]).answer or "") if replies else ""
    return Sample(id=str(rec.get("id") or default_id), images=images, question=question, answer=answer,
                  source=str(rec.get("source") or "sharegpt"), meta=dict(rec.get("meta") or {}),
                  conversation=conversation)


# --------------------------------------------------------------------------------------- verl

def read_verl_parquet(path: Path) -> tuple[list[Sample], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:
        raise PrismError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
    return _collect(((f"{path} row {i}", (i, r)) for i, r in enumerate(rows)),
                    lambda item: verl_sample(item[1], path, item[0]))


def verl_sample(rec: dict, path: Path, index: int) -> Sample:
    extra = rec.get("extra_info") or {}
    if isinstance(extra, str):
        extra = _json_field(extra, "extra_info", dict) or {}
    reward = rec.get("reward_model") or {}
    if isinstance(reward, str):
        reward = _json_field(reward, "reward_model", dict) or {}
    question = extra.get("question") if isinstance(extra.get("question"), str) else None
    if question is None:
        prompt = rec.get("prompt")
        if isinstance(prompt, str):
            prompt = _json_field(prompt, "prompt", list)
        if not isinstance(prompt, list):
            raise BadRow("prompt is not a list of messages")
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[0], str):
            raise BadRow("prompt has no user message")
        question = users[0].replace(IMAGE_TOKEN, "").strip()
    if not question.strip():
        raise BadRow("the question is empty")
    truth = reward.get("ground_truth", extra.get("answer"))
    if isinstance(truth, list):
        truth = truth[0] if truth else ""
    images = _images(rec.get("images"), path.parent)
    split = extra.get("split", "")
    idx = extra.get("index", index)
    source = str(rec.get("data_source") or path.stem)
    return Sample(id=f"{source}-{split}-{idx}" if split else f"{source}-{idx}", images=images, question=question,
                  answer=_text(truth, "ground_truth"), source=source, task=str(rec.get("ability") or ""),
                  meta={"extra_info": extra} if extra else {})


# --------------------------------------------------------------------------------------- HF datasets

_QUESTION_COLS = ("question", "problem", "query", "prompt")
_ANSWER_COLS = ("answer", "solution", "ground_truth", "label")
# file_name: an HF imagefolder's metadata.jsonl names its image relative to itself
_IMAGE_COLS = ("images", "image", "decoded_image", "file_name", "image_path")


def _from_datasets_cache(repo: str, split: str | None):
    """(samples, problems) of a hub dataset prepared in the `datasets` cache, or None when it is not there."""
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception:  # not cached (or not loadable offline): the hub snapshot path reports it
        return None
    return read_hf_dataset(ds, f"hub dataset {repo}", None)


def read_hf_folder(path: Path) -> tuple[list[Sample], list[str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise PrismError(f"cannot load the Hugging Face datasets folder {path}: {str(e).splitlines()[0]}") from None
    return read_hf_dataset(ds, str(path), path)


def read_hf_dataset(ds, where: str, base_dir: Path | None) -> tuple[list[Sample], list[str]]:
    """A datasets Dataset (or the train split of a DatasetDict) with question-like columns."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    path = Path(where)
    cols = ds.column_names
    qcol = next((c for c in _QUESTION_COLS if c in cols), None)
    if qcol is None:
        raise PrismError(f"{where}: no question column (looked for {', '.join(_QUESTION_COLS)}; has {', '.join(cols)})")
    acol = next((c for c in _ANSWER_COLS if c in cols), None)
    icol = next((c for c in _IMAGE_COLS if c in cols), None)
    if icol is not None:  # raw bytes instead of decoded PIL images: no decode/re-encode round trip
        feature = ds.features[icol]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(icol, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(icol, type(feature)(datasets.Image(decode=False)))

    def convert(item):
        i, rec = item
        rec = dict(rec)
        out = {"question": rec.get(qcol), "answer": rec.get(acol) if acol else "",
               "images": rec.get(icol) if icol else None, "id": rec.get("id", f"{path.name}-{i}")}
        for k in ("choices", "task", "source", "meta", "teacher"):
            if k in rec:
                out[k] = rec[k]
        if isinstance(out["answer"], list):
            out["answer"] = out["answer"][0] if out["answer"] else ""
        return sample_from_record(out, base_dir)

    return _collect(((f"{where} row {i}", (i, r)) for i, r in enumerate(ds)), convert)


# --------------------------------------------------------------------------------------- mixtures

def parse_mixture(specs: list[str]) -> list[tuple[str, float | None]]:
    """["a.parquet:0.9", "synth:train:2000:0.1", "b.json"] -> [(spec, weight)]; weight None if none given
    (callers concatenate unweighted sources as they are and resample only when weights are given).

    The weight is a final ":<number>" that is not part of the spec itself: for synth specs it must have
    a decimal point (synth:train:2000 is 2000 samples), and an existing path is never split."""
    out = []
    for raw in specs:
        spec = str(raw).strip()
        head, sep, tail = spec.rpartition(":")
        weight = None
        if sep and head and re.fullmatch(r"\d+(\.\d*)?|\.\d+", tail) and not Path(spec).exists():
            is_synth = head == "synth" or head.startswith("synth:")
            if not is_synth or "." in tail:
                spec, weight = head, float(tail)
        if weight is not None and weight <= 0:
            raise UsageError(f"data source {raw!r}: a mixture weight must be positive")
        same = [earlier for earlier, _ in out if _same_source(earlier, spec)]
        if same:   # a repeated line in a launch script would silently train on that source twice
            raise UsageError(f"--data {spec} is given twice" + (f" (as {same[0]})" if same[0] != spec else ""),
                             hint="give each source once; to weigh sources, give each a weight (a.jsonl:0.7 "
                                  "b.jsonl:0.3)")
        out.append((spec, weight))
    return out


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@dataclasses.dataclass
class Source:
    """One --data source as a stage uses it: its samples (after the stage's filter), its fingerprint for
    the manifest, the prism checkpoint it came from (a parent of the stage's output), if any, and what
    was dropped on the way: malformed rows (bad JSON, corrupt or oversized images, duplicate ids) and
    samples the stage cannot use."""

    spec: str
    weight: float | None
    samples: list[Sample]
    fingerprint: str
    checkpoint: Any = None  # stages.common.contract.checkpoint.CkptSpec of a curate checkpoint
    problems: list[str] = dataclasses.field(default_factory=list)
    filtered: int = 0
    need: str = ""


def load_sources(specs: list[str], keep=None, need: str = "", strict: bool = False, seed: int = 0) -> list[Source]:
    """Every --data source (mixture weights parsed), synth samples given oracle demonstrations, then
    filtered by keep(sample); malformed rows and dropped samples are counted and said on the console
    (`dropped_report` puts them in the manifest). `seed` is the run's: it draws synth's problems and its
    drift (a spec's own `:seedK` wins), so runs with different seeds train on different synth data."""
    from stages.common.contract import checkpoint, console
    from stages.common.contract.samples import fingerprint_samples
    from stages.common.world import synth

    sources = []
    for spec, weight in parse_mixture(specs):
        loaded, problems = load_samples(spec, strict=strict, seed=seed)
        if problems:
            console.warn(f"--data {spec}: skipped {len(problems)} malformed row(s); first: {problems[0]}")
        loaded = synth.with_oracle_demos(loaded)
        kept = [s for s in loaded if keep(s)] if keep is not None else loaded
        if len(kept) < len(loaded):
            console.warn(f"--data {spec}: {len(loaded) - len(kept)} sample(s) dropped ({need})")
        if not kept:
            raise PrismError(f"--data {spec} holds no usable samples" + (f" ({need})" if need else ""))
        ckpt = None
        if Path(spec).expanduser().is_dir():
            try:
                resolved = checkpoint.resolve(spec, role="--data")
                ckpt = resolved if resolved.kind == "prism" else None
            except PrismError:
                pass  # not a checkpoint (a data folder): no parent to record
        sources.append(Source(spec, weight, kept, fingerprint_samples(kept), ckpt, problems,
                              len(loaded) - len(kept), need))
    return sources


def dropped_report(sources: list[Source], examples: int = 3) -> dict:
    """{spec: {malformed, filtered, examples}} for the manifest summary; sources that lost nothing are left out."""
    out = {}
    for src in sources:
        if src.problems or src.filtered:
            out[src.spec] = {"malformed": len(src.problems), "filtered": src.filtered,
                             "filtered_because": src.need if src.filtered else "",
                             "examples": src.problems[:examples]}
    return out


def source_parents(sources: list[Source]) -> list[tuple]:
    return [("data", s.checkpoint) for s in sources if s.checkpoint is not None]


# --------------------------------------------------------------------------------------- hub datasets

def _looks_like_hub_dataset(spec: str) -> bool:
    from stages.common.contract.checkpoint import _HUB_ID

    repo = spec.split(":", 1)[0]
    return (bool(_HUB_ID.match(repo)) and not spec.startswith((".", "/", "~"))
            and not Path(repo.split("/")[0]).exists())


def read_hub_dataset(spec: str) -> tuple[list[Sample], list[str]]:
    """owner/name[:split] -> the dataset's snapshot in the local hub cache (downloaded first when online)."""
    repo, _, split = spec.partition(":")
    if hub.offline() and not hub.cached(repo, "dataset"):
        # what `datasets.load_dataset` prepared earlier lives in its own cache, not the hub's
        from_datasets = _from_datasets_cache(repo, split or None)
        if from_datasets is not None:
            return from_datasets
    folder = hub.snapshot(repo, repo_type="dataset", what="--data")
    root = folder / "data" if (folder / "data").is_dir() else folder
    return _read_many(split_files(root, split, f"hub dataset {repo}", hint=f"name one: --data {repo}:<split>"))


# --------------------------------------------------------------------------------------- LLaMA-Factory

_LF_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "user", "function_tag": "assistant",
             "system_tag": "system"}


def read_llamafactory(info_ref: str | Path, name: str | None) -> tuple[list[Sample], list[str]]:
    """An entry of a LLaMA-Factory dataset_info.json: its file, formatting (sharegpt or alpaca), column
    mapping and role tags. Prism also accepts sample-schema names as mapping keys (question, answer,
    images, id) for tables whose columns are named otherwise."""
    info_path = Path(info_ref).expanduser()
    if info_path.is_dir():
        info_path = info_path / "dataset_info.json"
    if not info_path.is_file():
        raise PrismError(f"data source {info_ref}: no dataset_info.json there")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrismError(f"{info_path} is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(info, dict) or not info:
        raise PrismError(f"{info_path} must map dataset names to entries")
    if name is None:
        if len(info) != 1:
            raise PrismError(f"{info_path} describes {len(info)} datasets; name one",
                             hint=f"--data {info_path}#{sorted(info)[0]} (names: {', '.join(sorted(info))})")
        name = next(iter(info))
    entry = info.get(name)
    if not isinstance(entry, dict):
        raise PrismError(f"{info_path} has no dataset {name!r}", hint=f"names: {', '.join(sorted(info))}")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise PrismError(f"{info_path} #{name}: formatting {formatting!r} is not supported (alpaca or sharegpt)")
    if entry.get("hf_hub_url") and not entry.get("file_name"):
        return read_hub_dataset(str(entry["hf_hub_url"]) + (f":{entry['split']}" if entry.get("split") else ""))
    data_path = info_path.parent / str(entry.get("file_name", ""))
    if not data_path.exists():
        raise PrismError(f"{info_path} #{name}: file_name {entry.get('file_name')!r} not found next to it")
    base_dir = data_path.parent if data_path.is_file() else data_path

    def convert(item):
        i, rec = item
        if isinstance(rec, _Broken):
            raise BadRow(rec.why)
        if not isinstance(rec, dict):
            raise BadRow(f"a row is a {type(rec).__name__}, not an object")
        if any(k in columns for k in ("question", "answer", "id")):
            mapped = dict(rec)
            for key, col in columns.items():
                if col in rec:
                    mapped[key] = rec[col]
            return sample_from_record(mapped, base_dir, default_id=f"{name}-{i}")
        if formatting == "sharegpt":
            return sharegpt_sample(_lf_sharegpt(rec, columns, tags), base_dir, f"{name}-{i}")
        return sharegpt_sample(_lf_alpaca(rec, columns), base_dir, f"{name}-{i}")

    return _collect(((f"{data_path} row {i}", (i, r)) for i, r in enumerate(_raw_rows(data_path))), convert)


def _lf_sharegpt(rec: dict, columns: dict, tags: dict) -> dict:
    role_tag, content_tag = tags.get("role_tag", "from"), tags.get("content_tag", "value")
    roles = {tags.get(t, default): role for t, role in _LF_ROLES.items()
             for default in [{"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
                              "function_tag": "function_call", "system_tag": "system"}[t]]}
    turns = rec.get(columns.get("messages", "conversations"))
    if not isinstance(turns, list):
        raise BadRow(f"no {columns.get('messages', 'conversations')!r} list")
    messages = [{"role": roles.get(t.get(role_tag), t.get(role_tag)), "content": t.get(content_tag)}
                if isinstance(t, dict) else t for t in turns]
    out = {"messages": messages, "images": rec.get(columns.get("images", "images"))}
    if columns.get("system") and isinstance(rec.get(columns["system"]), str):
        out["system"] = rec[columns["system"]]
    return out


def _lf_alpaca(rec: dict, columns: dict) -> dict:
    prompt = rec.get(columns.get("prompt", "instruction"))
    query = rec.get(columns.get("query", "input"))
    response = rec.get(columns.get("response", "output"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRow(f"no {columns.get('prompt', 'instruction')!r} text")
    text = prompt + (f"\n{query}" if isinstance(query, str) and query.strip() else "")
    messages = [{"role": "user", "content": text}]
    if isinstance(response, str):
        messages.append({"role": "assistant", "content": response})
    out = {"messages": messages, "images": rec.get(columns.get("images", "images"))}
    if columns.get("system") and isinstance(rec.get(columns["system"]), str):
        out["system"] = rec[columns["system"]]
    return out


def _raw_rows(path: Path) -> list:
    """Rows of a json / jsonl / parquet file (or a folder of them), as plain objects."""
    if path.is_dir():
        return [r for f in _data_files(path) for r in _raw_rows(f)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(_Broken(f"line {n} is not valid JSON"))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrismError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise PrismError(f"{path} must hold a JSON list of records")
    return data


# --------------------------------------------------------------------------------------- the registry

def _is_llamafactory(p: Path) -> bool:
    info = p / "dataset_info.json" if p.is_dir() else p
    return info.name == "dataset_info.json" and info.is_file() and _is_llamafactory_info(info)


def _read_synth(spec: str, seed: int) -> tuple[list[Sample], list[str]]:
    from stages.common.world import synth

    return synth.load(spec, seed=seed), []


def _read_hub_spec(spec: str, seed: int) -> tuple[list[Sample], list[str]]:
    try:
        return read_hub_dataset(spec)
    except PrismError as e:  # it may as well be a mistyped local path: say both
        raise PrismError(f"data source {spec} is not a local path; as a hub dataset: {e.message}",
                         hint=e.hint) from None


for _name, _reader in {
    # files and folders on this machine, tried in this order
    "prism checkpoint": on_path(_is_prism_dir, lambda p: _read_prism(p, str(p)), "a prism curate checkpoint"),
    "llamafactory": on_path(_is_llamafactory, lambda p: read_llamafactory(p, None),
                            "a LLaMA-Factory dataset_info.json (or DIR#name)"),
    "hf datasets folder": on_path(_is_hf_saved, read_hf_folder, "an HF datasets folder (save_to_disk)"),
    "snapshot": on_path(_is_snapshot, read_snapshot, "a hub snapshot folder (files under data/)"),
    "folder": on_path(lambda p: p.is_dir() and bool(_data_files(p)), read_dir, "a folder of data files"),
    "parquet": on_path(_suffix(".parquet"), read_parquet,
                       "*.parquet (sample schema, verl RL, or image/problem/solution columns)"),
    "jsonl": on_path(_suffix(".jsonl"), read_jsonl, "*.jsonl (sample schema, imagefolder metadata)"),
    "json": on_path(_suffix(".json"), read_json, "*.json (ShareGPT or a list of sample rows)"),
    "arrow": on_path(_suffix(".arrow"), read_arrow, "*.arrow (datasets' Arrow files)"),
    "csv": on_path(_suffix(".csv"), read_csv, "*.csv with a header (imagefolder metadata.csv)"),
    # specs named by their text
    "synth": by_name(lambda spec: spec == "synth" or spec.startswith("synth:"), _read_synth,
                     "synth[:train:N...] (the built-in benchmark)"),
    "llamafactory entry": by_name(lambda spec: "#" in spec, lambda spec, seed: read_llamafactory(*spec.rsplit("#", 1)),
                                  "dataset_info.json#name or DIR#name (a LLaMA-Factory entry)"),
    "glob": by_name(lambda spec: any(c in spec for c in "*?["), lambda spec, seed: read_glob(spec),
                    "a glob of data files (data/*.parquet)"),
    "hub dataset": by_name(_looks_like_hub_dataset, _read_hub_spec, "owner/name[:split] (a hub dataset)"),
}.items():
    READERS.register(_name, _reader)
