"""Bad inputs through the CLI (issue "End to end", item 4): each one ends with ONE error line that names
the problem, a non-zero exit, no traceback, and nothing half-written (no manifest; --out not created).

Every case runs `prism ...` in this process through typer's CliRunner; the inputs are built once per
module (tiny checkpoints are assembled with the checkpoint API, so no training runs here).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prism_cli.app import app
from stages.common.contract.checkpoint import MANIFEST, open_output, resolve
from stages.common.contract.samples import sample_to_row, write_shards
from stages.common.world.synth import load as synth_load
from stages.common.world.synth import with_oracle_demos

# ------------------------------------------------------------------------------------------- inputs

def _png(width: int = 16, height: int = 16, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height built row by row (a few hundred KB; never held decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" + b"\0" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _sample_row(**over) -> dict:
    row = sample_to_row(with_oracle_demos(synth_load("synth:train:1"))[0])
    row.update(over)
    return row


def _checkpoint(path: Path, stage: str, model_from: Path | None = None, data=None) -> Path:
    """A complete prism checkpoint of `stage` written through the checkpoint contract."""
    run = open_output(str(path), stage, {"built_by": "test_bad_inputs"}, [("policy", resolve("tiny"))])
    if model_from is not None:
        shutil.copytree(model_from, run.model_dir)
    if data is not None:
        write_shards(data, run.path / "data")
    return run.finalize()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_path):
    d = tmp_path_factory.mktemp("bad-inputs")
    good = with_oracle_demos(synth_load("synth:train:8"))
    p = {}
    p["curated"] = _checkpoint(d / "curated", "curate", data=good)
    p["sft"] = _checkpoint(d / "sft", "sft", model_from=tiny_path)

    run = open_output(str(d / "partial"), "sft", {}, [])  # what a killed run leaves: marker + state/
    run.state_dir.mkdir()
    p["partial"] = run.path

    p["edited"] = d / "edited"
    shutil.copytree(p["curated"], p["edited"])
    manifest = json.loads((p["edited"] / MANIFEST).read_text())
    manifest["summary"]["kept"] = 1000  # a hand edit; self_sha256 left alone
    (p["edited"] / MANIFEST).write_text(json.dumps(manifest, indent=1))

    p["tampered"] = d / "tampered"
    shutil.copytree(p["curated"], p["tampered"])
    shard = next((p["tampered"] / "data").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes() + b"\0")

    # a model directory whose tokenizer files were replaced by a tokenizer with a larger vocabulary
    from transformers import AutoTokenizer

    p["badtok"] = d / "badtok"
    shutil.copytree(tiny_path, p["badtok"])
    tok = AutoTokenizer.from_pretrained(str(tiny_path))
    tok.add_tokens([f"<extra_{i}>" for i in range(300)])
    tok.save_pretrained(str(p["badtok"]))

    p["corrupt_image.parquet"] = _write_parquet(d / "corrupt_image.parquet",
                                                [_sample_row(images=[b"these bytes are not an image"])])
    png = _png()
    (d / "truncated.png").write_bytes(png[:len(png) // 2])
    p["truncated_png.json"] = d / "truncated_png.json"
    p["truncated_png.json"].write_text(json.dumps([{
        "messages": [{"role": "user", "content": "<image>How many shapes?"},
                     {"role": "assistant", "content": "<caption>c</caption><think>t</think><answer>2</answer>"}],
        "images": ["truncated.png"]}]))
    whole = _write_parquet(d / "whole.parquet", [_sample_row()] * 4)
    p["truncated.parquet"] = d / "truncated.parquet"
    p["truncated.parquet"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    p["wrong_schema.parquet"] = _write_parquet(d / "wrong_schema.parquet", [{"text": "hi", "label": 1}])
    (d / "huge.png").write_bytes(_huge_png())
    p["huge.jsonl"] = d / "huge.jsonl"
    p["huge.jsonl"].write_text(json.dumps({"question": "What is shown?", "answer": "A", "images": ["huge.png"]})
                               + "\n")
    p["latin1.jsonl"] = d / "latin1.jsonl"
    p["latin1.jsonl"].write_bytes('{"question": "Qu\u00e9 forma es?", "answer": "A"}\n'.encode("latin-1"))
    p["malformed.json"] = d / "malformed.json"
    p["malformed.json"].write_text('[{"question": "a?", "answer": "1"},\n {"question": "b?" "answer": "2"}]')
    p["malformed.jsonl"] = d / "malformed.jsonl"
    p["malformed.jsonl"].write_text('{"question": "a?", "answer": "1"\n')
    p["empty.jsonl"] = d / "empty.jsonl"
    p["empty.jsonl"].write_bytes(b"")
    p["missing_image.jsonl"] = d / "missing_image.jsonl"
    p["missing_image.jsonl"].write_text(json.dumps({"question": "a?", "answer": "1", "images": ["nope.png"]}) + "\n")
    p["bad.yaml"] = d / "bad.yaml"
    p["bad.yaml"].write_text("lr: 1e-3\nbatch_size: [8\n")
    p["wrong_type.yaml"] = d / "wrong_type.yaml"
    p["wrong_type.yaml"].write_text("batch_size: eight\n")
    p["a_file"] = d / "a_file"
    p["a_file"].write_text("not a directory\n")
    # issue 19: what a researcher tries next
    p["eval"] = _checkpoint(d / "eval-tiny", "eval")
    p["hf_model"] = tiny_path
    p["url_image.jsonl"] = d / "url_image.jsonl"
    p["url_image.jsonl"].write_text(json.dumps({"question": "a?", "answer": "1",
                                                "images": ["https://example.com/cat.png"]}) + "\n")
    p["blank_lines.jsonl"] = d / "blank_lines.jsonl"
    p["blank_lines.jsonl"].write_text("\n\n  \n")
    p["nested.yaml"] = d / "nested.yaml"
    p["nested.yaml"].write_text("optimizer:\n  lr: 3e-5\n")
    p["typo.yaml"] = d / "typo.yaml"
    p["typo.yaml"].write_text("lr: 3e-5\nbatch_szie: 8\n")
    p["no_answers.jsonl"] = d / "no_answers.jsonl"
    p["no_answers.jsonl"].write_text(json.dumps({"id": "q1", "question": "what is shown?"}) + "\n")
    p["dir"] = d
    return p


# ------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    args: list[str]           # {name} is replaced by inputs[name], {out} by a fresh output path
    expect: str               # a distinctive part of the one error line
    code: int = 1
    env: dict = field(default_factory=dict)


SFT = ["sft", "--ckpt", "tiny", "--max-steps", "1", "--batch-size", "1", "--micro-batch-size", "1"]

CASES = {
    # data files
    "corrupt image bytes in a parquet row": Case([*SFT, "--data", "{corrupt_image.parquet}"],
                                                 "image 0 is not an image file"),
    "ShareGPT JSON pointing at a truncated PNG": Case([*SFT, "--data", "{truncated_png.json}"],
                                                      "corrupt or truncated"),
    "truncated parquet": Case([*SFT, "--data", "{truncated.parquet}"], "cannot read parquet file"),
    "parquet without the required columns": Case([*SFT, "--data", "{wrong_schema.parquet}"],
                                                 "no question column"),
    "20000x20000 image (decompression bomb)": Case([*SFT, "--data", "{huge.jsonl}"], "decompression bomb"),
    "jsonl that is not UTF-8": Case([*SFT, "--data", "{latin1.jsonl}"], "not UTF-8"),
    "malformed JSON": Case([*SFT, "--data", "{malformed.json}"], "not valid JSON"),
    "malformed jsonl line": Case([*SFT, "--data", "{malformed.jsonl}"], "not valid JSON"),
    "empty data file": Case([*SFT, "--data", "{empty.jsonl}"], "empty file"),
    "image path that does not exist": Case([*SFT, "--data", "{missing_image.jsonl}"], "'nope.png' not found"),
    "--data that does not exist": Case([*SFT, "--data", "{dir}/no-such.parquet"], "does not exist"),
    "malformed synth spec": Case([*SFT, "--data", "synth:train:many"], "synth spec", code=2),
    "--data of an eval output": Case([*SFT, "--data", "{eval}"], "is a 'eval' checkpoint; this stage needs 'curate'"),
    "--data of a model directory": Case([*SFT, "--data", "{hf_model}"], "is a model directory"),
    "image given as a URL": Case([*SFT, "--data", "{url_image.jsonl}"], "is a URL"),
    "jsonl of blank lines": Case([*SFT, "--data", "{blank_lines.jsonl}"], "holds no rows"),
    "glob matching nothing": Case([*SFT, "--data", "{dir}/nothing-*.parquet"], "matches no file"),
    "hub dataset not in the offline cache": Case([*SFT, "--data", "no-such-org/no-such-data"],
                                                 "not in the local hub cache and HF_HUB_OFFLINE is set"),
    "dataset_info.json entry that does not exist": Case([*SFT, "--data", "{dir}/dataset_info.json#x"],
                                                        "no dataset_info.json there"),
    "curate --gate verify on rows without answers": Case(["curate", "--teacher", "oracle", "--source",
                                                          "{no_answers.jsonl}"], "--gate verify needs ground-truth"),
    "rl with one rollout per prompt": Case(["rl", "--ckpt", "tiny", "--algo", "grpo", "--rollouts-per-prompt", "1"],
                                           "at least 2 rollouts per prompt", code=2),
    "rl --max-new-tokens 0": Case(["rl", "--ckpt", "tiny", "--max-new-tokens", "0"], "'max_new_tokens' must be",
                                  code=2),
    "negative lr": Case([*SFT, "--lr", "-1e-5"], "'lr' must be positive", code=2),
    "NaN lr": Case([*SFT, "--set", "lr=nan"], "'lr' is nan", code=2),
    "--report-to a tracker that does not exist": Case([*SFT, "--report-to", "tensorbord"], "unknown tracker", code=2),
    "align top_k above num_experts": Case(["align", "--ckpt", "tiny", "--data", "synth", "--set", "top_k=9"],
                                          "top_k 9 must be between 1 and num_experts", code=2),
    "YAML with a nested section": Case([*SFT, "--config", "{nested.yaml}"], "prism configs are flat", code=2),
    "YAML with a typo'd key": Case([*SFT, "--config", "{typo.yaml}"], "did you mean 'batch_size'", code=2),
    "--out inside the input checkpoint": Case([*SFT, "--ckpt", "{sft}", "--data", "synth:train:2", "--out",
                                               "{sft}/model/sub", "--overwrite"], "inside the input checkpoint"),
    "curate --source with only broken rows": Case(["curate", "--teacher", "oracle", "--source",
                                                   "{corrupt_image.parquet}"], "no usable rows"),
    # checkpoints
    "rl --ckpt of a curate checkpoint": Case(["rl", "--ckpt", "{curated}"], "is a 'curate' checkpoint"),
    "sft --data of an sft checkpoint": Case([*SFT, "--data", "{sft}"], "is a 'sft' checkpoint"),
    "manifest edited by hand": Case([*SFT, "--data", "{edited}"], "does not match its own checksum"),
    "file modified after writing": Case([*SFT, "--data", "{tampered}"], "does not match its checksum"),
    "missing checkpoint": Case(["rl", "--ckpt", "{dir}/no-such-ckpt"], "does not exist"),
    "--ckpt neither a local path nor a reachable hub id": Case(
        ["sft", "--ckpt", "no-such-org/no-such-model", "--data", "synth:train:2", "--max-steps", "1",
         "--batch-size", "1", "--micro-batch-size", "1"], "was looked up as a Hugging Face hub id"),
    "partial checkpoint as input": Case(["rl", "--ckpt", "{partial}"], "incomplete checkpoint"),
    "partial checkpoint as --data": Case([*SFT, "--data", "{partial}"], "incomplete checkpoint"),
    "export of a curate checkpoint": Case(["export", "--ckpt", "{curated}"], "is a 'curate' checkpoint"),
    # options and config
    "unknown eval task": Case(["eval", "--ckpt", "tiny", "--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'",
                              code=2),
    "unknown --algo": Case(["rl", "--ckpt", "tiny", "--algo", "ppo2"], "unknown --algo 'ppo2'", code=2),
    "bad --set key": Case([*SFT, "--set", "learning_rate_x=1"], "unknown config key 'learning_rate_x'", code=2),
    "--set value of the wrong type": Case([*SFT, "--set", "lr=fast"], "config key 'lr' expects a number", code=2),
    "YAML value of the wrong type": Case([*SFT, "--config", "{wrong_type.yaml}"], "'batch_size' expects an integer",
                                         code=2),
    "malformed YAML config": Case([*SFT, "--config", "{bad.yaml}"], "malformed YAML", code=2),
    "missing API key for a gemini teacher": Case(["curate", "--teacher", "gemini-3-flash", "--source",
                                                  "synth:train:2"], "no Gemini API key",
                                                 env={"GEMINI_API_KEY": None, "GOOGLE_API_KEY": None}),
    "--out pointing at a file": Case([*SFT, "--data", "synth:train:4", "--out", "{a_file}"], "exists and is a file"),
    "--out under a file": Case(["curate", "--teacher", "oracle", "--source", "synth:train:2", "--out",
                                "{a_file}/out"], "cannot write to --out"),
    # issue 33: contradictory options
    "--dynamic-sampling with --no-dynamic-sampling": Case(["rl", "--ckpt", "tiny", "--dynamic-sampling",
                                                           "--no-dynamic-sampling"], "contradict each other", code=2),
    # issue 33: the next inputs a researcher tries (docs/first-hour.md lists the ones that already worked)
    "--config pointing at a directory": Case([*SFT, "--config", "{dir}"], "is a directory, not a YAML file", code=2),
    "--dtype a training stage cannot run": Case([*SFT, "--data", "synth:train:4", "--dtype", "fp8"],
                                                "unknown --dtype 'fp8'", code=2),
    "rl --dry-run with an unknown --dtype": Case(["rl", "--ckpt", "tiny", "--data", "synth:train:4", "--dtype", "fp8",
                                                  "--dry-run"], "unknown --dtype 'fp8'", code=2),
    "sft --max-steps 0": Case([*SFT[:3], "--max-steps", "0", "--data", "synth:train:4"], "--max-steps 0 would train nothing",
                              code=2),
}


def _invoke(case: Case, inputs: dict, out: Path):
    names = {"out": str(out), **{k: str(v) for k, v in inputs.items()}}
    args = [re.sub(r"\{([^}]+)\}", lambda m: names[m.group(1)], a) for a in case.args]
    if "--out" not in args:
        args += ["--out", str(out)]
    return CliRunner().invoke(app, args, env=case.env or None)


def _check_one_clear_line(result, case: Case) -> str:
    err = result.stderr
    assert result.exit_code == case.code, f"exit {result.exit_code}, want {case.code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    line = errors[0]
    assert "internal error" not in line, f"reported as a prism bug: {line}"
    assert case.expect in line, line
    return line


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, inputs, tmp_path):
    case = CASES[name]
    out = tmp_path / "out"
    result = _invoke(case, inputs, out)
    _check_one_clear_line(result, case)
    if "{a_file}" not in " ".join(case.args):
        assert not (out / MANIFEST).exists()
        assert not out.exists(), f"{name}: --out was created: {sorted(p.name for p in out.iterdir())}"


def test_mismatched_tokenizer_is_refused_before_training(inputs, tmp_path):
    out = tmp_path / "out"
    case = Case([*SFT, "--ckpt", str(inputs["badtok"]), "--data", "synth:train:4"], "does not match its model")
    line = _check_one_clear_line(_invoke(case, inputs, out), case)
    assert "1,162 tokens" in line and "862 rows" in line, line
    assert not (out / MANIFEST).exists()


def test_mismatched_tokenizer_leaves_no_output_directory(inputs, tmp_path):
    out = tmp_path / "out"
    case = Case([*SFT, "--ckpt", str(inputs["badtok"]), "--data", "synth:train:4"], "does not match its model")
    _check_one_clear_line(_invoke(case, inputs, out), case)
    assert not out.exists()


def test_huge_image_is_refused_without_decoding(inputs):
    """The size comes from the header: refusing a 20000x20000 PNG must not allocate its pixels."""
    import tracemalloc

    from stages.common.data.formats import load_samples

    tracemalloc.start()
    try:
        with pytest.raises(Exception) as err:
            load_samples(str(inputs["huge.jsonl"]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "decompression bomb" in str(err.value)
    assert peak < 64 << 20, f"refusing the image allocated {peak >> 20} MiB"


def test_broken_rows_among_good_ones_are_skipped_and_counted(inputs, tmp_path):
    """One corrupt image in an otherwise good source: skipped and reported (--strict makes it fatal)."""
    from stages.common.data.formats import load_samples

    mixed = _write_parquet(tmp_path / "mixed.parquet", [_sample_row(id="good"),
                                                        _sample_row(id="bad", images=[b"GIF89a-but-not-really"])])
    samples, problems = load_samples(str(mixed))
    assert [s.id for s in samples] == ["good"]
    assert len(problems) == 1 and "row 1" in problems[0] and "image 0" in problems[0]
    case = Case(["curate", "--teacher", "oracle", "--strict", "--source", str(mixed)], "1 malformed row(s)")
    line = _check_one_clear_line(_invoke(case, inputs, tmp_path / "out"), case)
    assert "row 1" in line and "image 0" in line
    assert not (tmp_path / "out").exists()


def test_resume_where_there_is_no_run_says_it_starts_a_new_one(tmp_path, capsys):
    """--resume with a mistyped --out: the new run from step 0 is said, not silent (issue 33)."""
    from stages.common.contract.checkpoint import open_output

    run = open_output(str(tmp_path / "typo"), "sft", {"lr": 1.0}, [], resume=True)
    assert not run.resuming
    assert "holds no interrupted sft run; starting a new one from step 0" in capsys.readouterr().err
