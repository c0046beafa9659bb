"""Readers for every accepted source format, all returning Samples; `load_samples(spec)` picks one.

    out/curated                 a prism checkpoint directory (its data/ shards)
    data.parquet, data.jsonl    rows in the sample schema (stages/common/data.py); a directory of them
    data.json                   LLaMA-Factory ShareGPT multimodal JSON (images by path, relative to the file)
    rl.parquet                  verl-style RL parquet (prompt, images, reward_model.ground_truth, extra_info)
    hf_folder/                  a Hugging Face datasets folder (datasets.save_to_disk)
    synth[:train:N...]          the built-in synthetic benchmark

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

from prism_cli.errors import PrismError, UsageError
from stages.common.data import Sample, Teacher, read_shards

IMAGE_TOKEN = "<image>"
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "model": "assistant"}


class BadRow(Exception):
    """One row that cannot become a Sample; the message says why (the caller adds where)."""


# --------------------------------------------------------------------------------------- dispatch

def load_samples(spec: str, strict: bool = False, seed: int = 0) -> tuple[list[Sample], list[str]]:
    """(samples, problems) for a source spec; problems name each skipped row by position."""
    spec = str(spec).strip()
    if not spec:
        raise UsageError("an empty data source was given")
    path = Path(spec).expanduser()
    if not path.exists() and (spec == "synth" or spec.startswith("synth:")):
        from stages.common import synth

        return synth.load(spec, seed=seed), []
    if not path.exists():
        raise PrismError(f"data source {spec} does not exist",
                         hint="give a prism data dir, *.parquet, *.jsonl, ShareGPT *.json, an HF datasets folder "
                              "or synth[:train:N]")
    if path.is_dir():
        samples, problems = _read_dir(path, spec)
    else:
        samples, problems = _read_file(path)
    samples, dup_problems = _dedupe(samples, spec)
    problems += dup_problems
    if problems and not samples:
        # nothing usable is not a skip-and-count situation: say what is wrong with the first row
        raise PrismError(f"no usable rows in {spec}: {len(problems)} malformed row(s); first: {problems[0]}")
    if problems and strict:
        raise PrismError(f"{len(problems)} malformed row(s) in {spec}; first: {problems[0]}",
                         hint="fix the rows, or drop --strict to skip and count them")
    return samples, problems


def _read_dir(path: Path, spec: str) -> tuple[list[Sample], list[str]]:
    from prism_cli.checkpoint import MANIFEST, RUN_MARKER, require_stage, resolve

    if (path / MANIFEST).is_file() or (path / RUN_MARKER).is_file():
        ckpt = require_stage(resolve(spec, role="--data"), ("curate",), role="--data")
        return read_shards(ckpt.path / "data"), []
    if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        return read_hf_folder(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl", ".json"))
    if not files:
        raise PrismError(f"data source {spec} is a directory with nothing prism reads",
                         hint="expected prism.json, an HF datasets folder, or *.parquet / *.jsonl / *.json files")
    samples, problems = [], []
    for f in files:
        s, p = _read_file(f)
        samples += s
        problems += p
    return samples, problems


def _read_file(path: Path) -> tuple[list[Sample], list[str]]:
    if path.suffix in (".parquet", ".jsonl", ".json") and path.stat().st_size == 0:
        raise PrismError(f"data source {path} is an empty file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:
            raise PrismError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None
        if {"id", "images", "question"} <= set(names):
            return read_sample_parquet(path)
        if "prompt" in names and ("reward_model" in names or "extra_info" in names):
            return read_verl_parquet(path)
        raise PrismError(f"{path} is neither in the prism sample schema nor verl-style RL parquet "
                         f"(columns: {', '.join(names)})")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        return read_json(path)
    raise PrismError(f"data source {path}: unknown file type {path.suffix!r}",
                     hint="prism reads .parquet, .jsonl, .json (ShareGPT) and directories")


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
        if value.startswith("data:") and ";base64," in value:
            try:
                return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
            except ValueError:
                raise BadRow("an image data URL is not valid base64") from None
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if p.is_file():
            return p.read_bytes()
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

def sample_from_record(rec: Any, base_dir: Path | None = None, default_id: str = "") -> Sample:
    """A sample-schema dict (a parquet row or a jsonl object) -> Sample, or BadRow."""
    if not isinstance(rec, dict):
        raise BadRow(f"a row is a {type(rec).__name__}, not an object")
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
                    line = raw.decode("utf-8")
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
        data = json.loads(path.read_bytes().decode("utf-8"))
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
_IMAGE_COLS = ("images", "image", "decoded_image")


def read_hf_folder(path: Path) -> tuple[list[Sample], list[str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise PrismError(f"cannot load the Hugging Face datasets folder {path}: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    cols = ds.column_names
    qcol = next((c for c in _QUESTION_COLS if c in cols), None)
    if qcol is None:
        raise PrismError(f"{path}: no question column (looked for {', '.join(_QUESTION_COLS)}; has {', '.join(cols)})")
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
        return sample_from_record(out, path)

    return _collect(((f"{path} row {i}", (i, r)) for i, r in enumerate(ds)), convert)


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
        out.append((spec, weight))
    return out


@dataclasses.dataclass
class Source:
    """One --data source as a stage uses it: its samples (after the stage's filter), its fingerprint for
    the manifest, and the prism checkpoint it came from (a parent of the stage's output), if any."""

    spec: str
    weight: float | None
    samples: list[Sample]
    fingerprint: str
    checkpoint: Any = None  # prism_cli.checkpoint.CkptSpec of a curate checkpoint


def load_sources(specs: list[str], keep=None, need: str = "", strict: bool = False) -> list[Source]:
    """Every --data source (mixture weights parsed), synth samples given oracle demonstrations, then
    filtered by keep(sample); dropped samples are reported with `need` (why the stage needs them)."""
    from prism_cli import checkpoint, console
    from stages.common import synth
    from stages.common.data import fingerprint_samples

    sources = []
    for spec, weight in parse_mixture(specs):
        loaded, _problems = load_samples(spec, strict=strict)
        loaded = synth.with_oracle_demos(loaded)
        kept = [s for s in loaded if keep(s)] if keep is not None else loaded
        if len(kept) < len(loaded):
            console.warn(f"--data {spec}: {len(loaded) - len(kept)} sample(s) dropped ({need})")
        if not kept:
            raise PrismError(f"--data {spec} holds no usable samples" + (f" ({need})" if need else ""))
        ckpt = None
        try:
            resolved = checkpoint.resolve(spec, role="--data")
            ckpt = resolved if resolved.kind == "prism" else None
        except PrismError:
            pass  # not a checkpoint (a file or synth): no parent to record
        sources.append(Source(spec, weight, kept, fingerprint_samples(kept), ckpt))
    return sources


def source_parents(sources: list[Source]) -> list[tuple]:
    return [("data", s.checkpoint) for s in sources if s.checkpoint is not None]
