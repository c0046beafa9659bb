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
