"""The sample schema (one row per problem) and its on-disk form.

A Sample carries everything a stage needs about one problem, images included as encoded bytes, so a
data directory is self-contained. On disk: parquet shards under <ckpt>/data/, one column per field;
the nested fields (choices, teacher, meta, conversation) are JSON text so the schema never drifts
between pyarrow versions.

Readers for other formats (ShareGPT JSON, verl parquet, HF datasets folders, jsonl) live in
stages/common/data/formats.py and all return Samples; `load_samples(spec)` picks one by the spec.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from stages.common.contract.errors import PrismError


@dataclass
class Teacher:
    caption: str
    think: str
    answer: str
    model: str = ""
    usage: dict = field(default_factory=dict)


@dataclass
class Sample:
    id: str
    images: list[bytes]
    question: str
    answer: str = ""
    choices: list[str] | None = None
    task: str = ""
    source: str = ""
    teacher: Teacher | None = None
    meta: dict = field(default_factory=dict)
    # A ready-made conversation for plain SFT data (ShareGPT): [{"role": ..., "content": str}], where
    # user turns mark image positions with "<image>". None for problem-style samples.
    conversation: list[dict] | None = None

    def pil_images(self):
        """Decode the images; a corrupt one raises PrismError naming the sample."""
        from PIL import Image, UnidentifiedImageError

        out = []
        for i, raw in enumerate(self.images):
            try:
                img = Image.open(io.BytesIO(raw))
                img.load()
            except Image.DecompressionBombError:
                raise PrismError(f"sample {self.id}: image {i} is too large to decode safely (over PIL's "
                                 f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise PrismError(f"sample {self.id}: image {i} cannot be decoded ({e.__class__.__name__})") from None
            out.append(to_rgb(img))
        return out


def to_rgb(img):
    """An 8-bit RGB image as the camera or the author meant it: EXIF rotation applied (phone photos),
    transparency composited on white (convert() alone turns transparent pixels black), 16-bit and
    32-bit greyscale scaled to 8 bits (convert() alone clips them to white); CMYK, palette, greyscale
    converted."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if img.mode in ("I", "F") and values.max(initial=0) > 65535:
            top = float(values.max())
        img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


COLUMNS = ["id", "images", "question", "answer", "choices", "task", "source", "teacher", "meta", "conversation"]


def sample_to_row(s: Sample) -> dict:
    return {
        "id": s.id,
        "images": list(s.images),
        "question": s.question,
        "answer": s.answer,
        "choices": json.dumps(s.choices) if s.choices is not None else None,
        "task": s.task,
        "source": s.source,
        "teacher": json.dumps(dataclasses.asdict(s.teacher)) if s.teacher is not None else None,
        "meta": json.dumps(s.meta, sort_keys=True, default=str),
        "conversation": json.dumps(s.conversation) if s.conversation is not None else None,
    }


def row_to_sample(row: dict) -> Sample:
    teacher = json.loads(row["teacher"]) if row.get("teacher") else None
    return Sample(
        id=str(row["id"]),
        images=[bytes(b) for b in (row.get("images") or [])],
        question=row.get("question") or "",
        answer=row.get("answer") or "",
        choices=json.loads(row["choices"]) if row.get("choices") else None,
        task=row.get("task") or "",
        source=row.get("source") or "",
        teacher=Teacher(**teacher) if teacher else None,
        meta=json.loads(row["meta"]) if row.get("meta") else {},
        conversation=json.loads(row["conversation"]) if row.get("conversation") else None,
    )


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("images", pa.list_(pa.binary())), ("question", pa.string()),
        ("answer", pa.string()), ("choices", pa.string()), ("task", pa.string()), ("source", pa.string()),
        ("teacher", pa.string()), ("meta", pa.string()), ("conversation", pa.string()),
    ])


def write_shards(samples: Iterable[Sample], data_dir: str | Path, rows_per_shard: int = 2048) -> list[Path]:
    """Write samples as parquet shards data-00000.parquet, ...; returns the shard paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    schema = _arrow_schema()
    paths: list[Path] = []
    batch: list[dict] = []

    def flush():
        path = data_dir / f"data-{len(paths):05d}.parquet"
        table = pa.Table.from_pylist(batch, schema=schema)
        pq.write_table(table, path)
        paths.append(path)
        batch.clear()

    for s in samples:
        batch.append(sample_to_row(s))
        if len(batch) >= rows_per_shard:
            flush()
    if batch or not paths:
        flush()
    return paths


def read_shards(data_dir: str | Path) -> list[Sample]:
    """Read every shard of a data directory (sorted by name) back into Samples."""
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    shards = sorted(data_dir.glob("*.parquet"))
    if not shards:
        raise PrismError(f"no parquet shards in {data_dir}")
    out: list[Sample] = []
    for shard in shards:
        try:
            table = pq.read_table(shard)
        except Exception as e:  # pyarrow raises several types for truncated/corrupt files
            raise PrismError(f"cannot read parquet shard {shard}: {str(e).splitlines()[0]}") from None
        missing = [c for c in ("id", "images", "question") if c not in table.column_names]
        if missing:
            raise PrismError(f"{shard} is not in the prism sample schema (missing columns: {', '.join(missing)})")
        for row in table.to_pylist():
            out.append(row_to_sample(row))
    return out


def fingerprint_samples(samples: Iterable[Sample]) -> str:
    """A content hash of a sample list (ids, text and image bytes), recorded in manifests."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        h.update(b"\0")
        h.update(s.question.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        h.update(s.answer.encode("utf-8", "surrogatepass"))
        for img in s.images:
            h.update(hashlib.sha256(img).digest())
        if s.teacher is not None:
            h.update(json.dumps(dataclasses.asdict(s.teacher), sort_keys=True).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return tuple(order)


def stream_item(items: list, position: int, seed: int):
    """The item at a position of an endless stream of seeded per-epoch permutations. Stages that draw
    prompts (rl, align) keep only a cursor, so a resumed run sees exactly what an uninterrupted one would."""
    epoch, within = divmod(position, len(items))
    return items[_epoch_order(len(items), seed, epoch)[within]]
