"""What a researcher hits in the first hour (issue 19): credentials in URLs, hub ids without network,
truncated weights, curate guards, prompt-length limits, dropped rows in the manifest, config rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_cli import config
from prism_cli.checkpoint import load_manifest
from prism_cli.errors import PrismError, UsageError
from prism_cli.redact import redact


def test_redact_userinfo_and_query_tokens():
    assert redact("openai:http://user:TOK123@host:8000/v1#m") == "openai:http://<redacted>@host:8000/v1#m"
    assert redact("https://host/v1?api_key=abc&x=1") == "https://host/v1?api_key=<redacted>&x=1"
    assert redact("no url here user:pw@host") == "no url here user:pw@host"


def test_teacher_url_credentials_never_reach_the_checkpoint_or_the_console(tmp_path, capsys):
    from stages.common.protocol import format_response
    from stages.common.synth import load as synth_load
    from stages.curate.config import CurateConfig
    from stages.curate.run import run
    from tests.fakes.openai_server import FakeOpenAI

    samples = synth_load("synth:train:3")
    answers = {s.question: format_response("- shapes", "solve", s.answer) for s in samples}
    with FakeOpenAI(lambda body: answers[body["messages"][1]["content"][-1]["text"]]) as fake:
        url = fake.url.replace("://", "://alice:TOK-SECRET-42@")
        out = run(config.resolve(CurateConfig, flags={"source": ["synth:train:3"], "teacher": f"openai:{url}#vlm",
                                                       "out": str(tmp_path / "o"), "concurrency": 1}))
    assert load_manifest(out)["config"]["teacher"].startswith("openai:http://<redacted>@127.0.0.1")
    leaks = [p for p in out.rglob("*") if p.is_file() and b"TOK-SECRET-42" in p.read_bytes()]
    assert leaks == []
    captured = capsys.readouterr()
    assert "TOK-SECRET-42" not in captured.err + captured.out


def _rows_without_answers(tmp_path: Path) -> Path:
    path = tmp_path / "noanswers.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "question": f"what is shown {i}?"}) + "\n" for i in range(3)))
    return path


def test_curate_gate_verify_without_answers_refuses_before_any_teacher_call(tmp_path):
    from stages.curate.config import CurateConfig
    from stages.curate.run import run
    from tests.fakes.openai_server import FakeOpenAI

    with FakeOpenAI(lambda body: "never asked") as fake:
        cfg = config.resolve(CurateConfig, flags={"source": [str(_rows_without_answers(tmp_path))],
                                                  "teacher": f"openai:{fake.url}#vlm", "out": str(tmp_path / "o")})
        with pytest.raises(PrismError, match="--gate verify needs ground-truth answers, and none of the 3"):
            run(cfg)
        assert fake.bodies == [] and not (tmp_path / "o").exists()


def test_curate_student_that_is_a_curate_checkpoint_says_so(tmp_path):
    from stages.curate.config import CurateConfig
    from stages.curate.run import run

    curated = run(config.resolve(CurateConfig, flags={"source": ["synth:train:2"], "teacher": "oracle",
                                                      "out": str(tmp_path / "cur")}))
    cfg = config.resolve(CurateConfig, flags={"source": ["synth:train:2"], "teacher": "oracle", "select": "unsolved",
                                              "student": str(curated), "out": str(tmp_path / "o")})
    with pytest.raises(PrismError, match="--student .* is a 'curate' checkpoint; this stage needs 'base' or 'sft'"):
        run(cfg)


def test_truncated_safetensors_in_a_plain_hf_folder_names_the_file(tmp_path, tiny_path):
    import shutil

    from stages.common.models import load_policy

    folder = tmp_path / "hf-model"
    shutil.copytree(tiny_path, folder)
    weights = sorted(folder.glob("*.safetensors"))[0]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrismError, match=f"weights file {weights} is damaged \\(truncated"):
        load_policy(str(folder))
    weights.write_bytes(data[:5])
    with pytest.raises(PrismError, match="shorter than a safetensors header"):
        load_policy(str(folder))


def test_hub_model_id_without_network_fails_in_seconds(monkeypatch):
    from prism_cli.checkpoint import resolve

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # refused at once, as a machine without network
    with pytest.raises(PrismError, match="--ckpt Qwen/Nope-VL: cannot reach http://127.0.0.1:9 .*not in the local "
                                         "cache"):
        resolve("Qwen/Nope-VL")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("Qwen/Nope-VL").kind == "hub"  # offline mode: the cache decides later, no probe
