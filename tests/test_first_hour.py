"""What a researcher hits in the first hour (issue 19): credentials in URLs, hub ids without network,
truncated weights, curate guards, prompt-length limits, dropped rows in the manifest, config rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.common.contract import config
from stages.common.contract.checkpoint import load_manifest
from stages.common.contract.errors import PrismError, UsageError
from stages.common.contract.redact import redact


def test_redact_userinfo_and_query_tokens():
    assert redact("openai:http://user:TOK123@host:8000/v1#m") == "openai:http://<redacted>@host:8000/v1#m"
    assert redact("https://host/v1?api_key=abc&x=1") == "https://host/v1?api_key=<redacted>&x=1"
    assert redact("no url here user:pw@host") == "no url here user:pw@host"


def test_teacher_url_credentials_never_reach_the_checkpoint_or_the_console(tmp_path, capsys):
    from stages.common.protocol import format_response
    from stages.common.world.synth import load as synth_load
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

    from stages.common.models.loading import load_policy

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
    from stages.common.contract.checkpoint import resolve

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # refused at once, as a machine without network
    with pytest.raises(PrismError, match="--ckpt Qwen/Nope-VL: cannot reach http://127.0.0.1:9 .*not in the local "
                                         "cache"):
        resolve("Qwen/Nope-VL")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("Qwen/Nope-VL").kind == "hub"  # offline mode: the cache decides later, no probe


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


def test_rl_drops_overlong_prompts_and_reports_dropped_rows_in_the_manifest(tmp_path, capsys):
    import base64

    from stages.common.contract.samples import sample_to_row
    from stages.common.world.synth import load as synth_load
    from stages.rl.config import RLConfig
    from stages.rl.run import run

    rows = [dict(sample_to_row(s), images=["data:image/png;base64," + base64.b64encode(s.images[0]).decode()])
            for s in synth_load("synth:train:4")]
    rows[1] = dict(rows[1], question="why? " * 20000)     # 100 KB of question
    rows.append(dict(rows[2], id="sliver", images=["data:image/png;base64," + base64.b64encode(_png(4000, 3)).decode()]))
    lines = [json.dumps(r, default=str) for r in rows] + ["{broken", json.dumps(rows[0], default=str)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = run(config.resolve(RLConfig, flags=dict(algo="grpo", ckpt="tiny", data=[str(data)], out=str(tmp_path / "rl"),
                                                  steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=4,
                                                  engine="hf", warmup=0, seed=0)))
    dropped = load_manifest(out)["summary"]["data_dropped"]
    assert dropped[str(data)]["malformed"] == 3           # the broken line, the duplicate id, the 4000x3 image
    assert any("4000x3" in e for e in dropped[str(data)]["examples"])
    assert dropped["max_prompt_chars"] == {"filtered": 1, "limit": 16000}
    err = capsys.readouterr().err
    assert "skipped 3 malformed row(s)" in err and "dropped 1 prompt(s) longer than max_prompt_chars=16000" in err


@pytest.mark.parametrize("flags, message", [
    (dict(algo="grpo", rollouts_per_prompt=1), "needs at least 2 rollouts per prompt"),
    (dict(max_new_tokens=0), "'max_new_tokens' must be at least 1"),
    (dict(algo="dapo", max_new_tokens=512, overlong_buffer=4096), "overlong_buffer 4096 is not below max_new_tokens 512"),
    (dict(lr=-1e-6), "'lr' must be positive"),
    (dict(lr=float("nan")), "'lr' is nan, not a finite number"),
    (dict(top_p=0.0), "'top_p' must be in"),
    (dict(temperature=0.0), "temperature must be positive"),
    (dict(report_to="tensorbord"), "unknown tracker"),
])
def test_rl_config_rules_refuse_at_resolution_so_dry_run_catches_them(flags, message):
    from stages.rl.config import RLConfig

    with pytest.raises(UsageError, match=message):
        config.resolve(RLConfig, flags=dict(ckpt="tiny", dry_run=True, **flags))


def test_dapo_default_overlong_buffer_keeps_its_proportion_on_short_responses():
    from stages.rl.config import RLConfig

    assert config.resolve(RLConfig, flags=dict(ckpt="tiny")).resolved("overlong_buffer") == 4096
    assert config.resolve(RLConfig, flags=dict(ckpt="tiny", max_new_tokens=512)).resolved("overlong_buffer") == 102


def test_align_top_k_above_experts_and_nan_lr_are_refused():
    from stages.align.config import AlignConfig

    with pytest.raises(UsageError, match="top_k 8 must be between 1 and num_experts \\(4\\)"):
        config.resolve(AlignConfig, flags=dict(ckpt="tiny", data=["synth"], top_k=8))
    with pytest.raises(UsageError, match="'disc_lr' is inf"):
        config.resolve(AlignConfig, flags=dict(ckpt="tiny", data=["synth"]), sets=["disc_lr=inf"])


@pytest.fixture()
def sft_with_data(tmp_path, tiny_path):
    """A finished sft checkpoint (the tiny model as its model/) that dropped rows of its data."""
    import shutil

    from stages.common.contract import checkpoint
    run_dir = checkpoint.open_output(str(tmp_path / "runs" / "sft"), "sft", {"lr": 1e-5, "data": ["d.jsonl"]},
                                     [("policy", checkpoint.resolve("tiny"))])
    shutil.copytree(tiny_path, run_dir.model_dir, ignore=shutil.ignore_patterns(".complete"))
    return run_dir.finalize(summary={"final_loss": 1.0, "data_dropped": {"d.jsonl": {"malformed": 2, "filtered": 1}}},
                            data={"d.jsonl": "f00dfeedbeefcafe0123"})


def test_inspect_shows_data_lineage_and_reads_an_export(sft_with_data, tmp_path):
    import os

    from typer.testing import CliRunner

    from prism_cli.app import app
    from stages.export.config import ExportConfig
    from stages.export.run import run as export

    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(sft_with_data)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "data lineage" in r.stdout and "d.jsonl" in r.stdout and "f00dfeedbeefcafe" in r.stdout
    assert "2 malformed, 1 filtered" in r.stdout
    hf = export(config.resolve(ExportConfig, flags={"ckpt": str(sft_with_data), "out": str(tmp_path / "hf"),
                                                    "dtype": "fp32"}))
    r = runner.invoke(app, ["inspect", str(hf)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "exported Hugging Face folder" in r.stdout and str(sft_with_data) in r.stdout
    assert "d.jsonl" in r.stdout and "2 malformed, 1 filtered" in r.stdout
    r = runner.invoke(app, ["inspect", "--verify", str(hf)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "verified" in r.stdout, r.output
    weights = sorted(hf.glob("*.safetensors"))[0]
    umask = os.umask(0o022)
    os.umask(umask)
    assert weights.stat().st_mode & 0o444 & ~umask == 0o444 & ~umask   # readable as the umask allows, not 0600
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF          # one damaged byte, same size
    weights.write_bytes(bytes(data))
    r = runner.invoke(app, ["inspect", "--verify", str(hf)], env={"COLUMNS": "200"})
    assert r.exit_code == 1 and f"{weights.name}: sha256 mismatch" in r.output, r.output


def test_export_out_onto_its_own_checkpoint_is_refused(sft_with_data):
    from stages.export.config import ExportConfig
    from stages.export.run import run as export

    for out in (sft_with_data, sft_with_data / "model", sft_with_data.parent):
        with pytest.raises(PrismError, match="input checkpoint"):
            export(config.resolve(ExportConfig, flags={"ckpt": str(sft_with_data), "out": str(out), "overwrite": True}))
    assert load_manifest(sft_with_data)["stage"] == "sft"


def test_sft_reports_dropped_rows_in_the_manifest(tmp_path):
    import base64
    import io

    from PIL import Image

    from stages.common.contract.samples import sample_to_row
    from stages.common.world.synth import load as synth_load
    from stages.common.world.synth import with_oracle_demos
    from stages.sft.config import SFTConfig
    from stages.sft.run import run

    rows = [dict(sample_to_row(s), images=["data:image/png;base64," + base64.b64encode(s.images[0]).decode()])
            for s in with_oracle_demos(synth_load("synth:train:4"))]
    rows.append(dict(rows[0], id="bad", images=["missing.png"]))
    sliver = io.BytesIO()
    Image.new("RGB", (4000, 3), (9, 9, 9)).save(sliver, format="PNG")  # aspect ratio 1333: the processor refuses it
    rows.append(dict(rows[1], id="sliver", images=["data:image/png;base64," + base64.b64encode(sliver.getvalue()).decode()]))
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    out = run(config.resolve(SFTConfig, flags=dict(ckpt="tiny", data=[str(data)], out=str(tmp_path / "sft"),
                                                   batch_size=2, micro_batch_size=2, max_steps=1, eval_fraction=0.0,
                                                   dtype="bf16")))
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    readable = 0o666 & ~umask   # the weights as shareable as any file the user makes (not the 0600 temp file's)
    assert stat.S_IMODE((out / "model" / "model.safetensors").stat().st_mode) & readable == readable
    if not torch.cuda.is_available():  # --dtype bf16 changes nothing on a CPU: recorded as what ran
        assert load_manifest(out)["config"]["dtype"] == "fp32"
    dropped = load_manifest(out)["summary"]["data_dropped"][str(data)]
    assert dropped["malformed"] == 2 and "'missing.png' not found" in dropped["examples"][0]
    assert "4000x3: an aspect ratio over 200" in dropped["examples"][1]


def test_sft_skips_a_sample_the_processor_refuses_and_encodes_the_rest(tiny_path):
    """A row that reached encoding with an image the processor cannot resize (here one built in memory,
    past the load-time check) is skipped with its reason; the others in its chunk still encode."""
    import dataclasses
    import io

    from PIL import Image

    from stages.common.contract.checkpoint import resolve
    from stages.common.models.loading import load_processor
    from stages.common.world.synth import load as synth_load
    from stages.common.world.synth import with_oracle_demos
    from stages.sft.run import encode_chunk

    samples = with_oracle_demos(synth_load("synth:train:3"))
    sliver = io.BytesIO()
    Image.new("RGB", (3, 4000)).save(sliver, format="PNG")
    samples[1] = dataclasses.replace(samples[1], images=[sliver.getvalue()])
    out = encode_chunk(samples, load_processor(resolve("tiny")), None, 4096, True)
    assert not isinstance(out[0], str) and not isinstance(out[2], str)
    assert isinstance(out[1], str) and out[1].startswith("the processor refused it (") and "200" in out[1]


def test_rl_that_learns_nothing_warns_and_a_slow_step_keeps_the_log_alive(tmp_path, capsys, monkeypatch):
    """Every rollout cut at max_new_tokens and a zero gradient on every step: warned on the console and
    recorded in the manifest. The scoring is slowed past the progress interval: lines keep coming within
    the step, naming the phase (a cluster log, stderr not a terminal)."""
    import time

    from stages.common.contract import console
    from stages.rl import run as rl_run
    from stages.rl.config import RLConfig

    score = rl_run.score_rows

    def slow_score(*args, **kwargs):
        time.sleep(0.6)   # a step's scoring: 0.6 s, three progress intervals
        return score(*args, **kwargs)

    monkeypatch.setattr(rl_run, "score_rows", slow_score)
    monkeypatch.setattr(console, "HEARTBEAT", True)
    monkeypatch.delenv("PRISM_NO_PROGRESS", raising=False)
    monkeypatch.setenv("PRISM_PROGRESS_EVERY", "0.2")
    out = rl_run.run(config.resolve(RLConfig, flags=dict(algo="grpo", ckpt="tiny", data=["synth:train:4"],
                                                         out=str(tmp_path / "rl"), steps=2, prompts_per_step=2,
                                                         rollouts_per_prompt=2, max_new_tokens=2, engine="hf",
                                                         warmup=0, seed=0)))
    warnings = load_manifest(out)["summary"]["warnings"]
    assert len(warnings) == 2
    assert warnings[0].startswith("every rollout of all 2 step(s) hit max_new_tokens=2")
    assert warnings[1].startswith("grad_norm was 0.0 on all 2 step(s)")
    err = capsys.readouterr().err
    assert "every rollout of step 1 hit max_new_tokens=2" in err and all(w in err for w in warnings)
    assert len([line for line in err.splitlines() if "| in score for" in line]) >= 2, err


def test_learning_warnings_stay_quiet_on_a_run_that_learns():
    from stages.rl.run import learning_warnings

    records = [{"truncated/ratio": 1.0, "update/grad_norm": 0.0}, {"truncated/ratio": 0.5, "update/grad_norm": 0.3}]
    assert learning_warnings(records, 128) == []
    assert learning_warnings([], 128) == []
    assert len(learning_warnings([{"truncated/ratio": 1.0, "update/grad_norm": 0.0}], 128)) == 2


def test_training_a_policy_from_a_discriminator_is_refused(tmp_path):
    """out/align/discriminator is a reward model with an untrained LM head: one line naming it, and the
    hint names the align checkpoint whose policy was meant."""
    from typer.testing import CliRunner

    from prism_cli.app import app
    from stages.common.contract.checkpoint import open_output

    run = open_output(str(tmp_path / "align"), "align", {"seed": 0}, [])
    (run.path / "discriminator").mkdir()
    (run.path / "discriminator" / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_vl_moe", "prism_discriminator": {"variant": "moe", "text_only": False}}))
    run.finalize()
    disc = tmp_path / "align" / "discriminator"
    for stage in ("sft", "rl", "eval"):
        args = [stage, "--ckpt", str(disc), "--out", str(tmp_path / stage)]
        args += {"sft": ["--data", "synth:train:4"], "rl": ["--data", "synth:train:4"], "eval": []}[stage]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "is a PRISM discriminator" in lines[0], result.output
        assert f"--ckpt {tmp_path / 'align'}" in lines[0]
        assert not (tmp_path / stage).exists()


def test_reused_discriminator_records_its_own_shape_and_refuses_a_different_one(tmp_path, capsys):
    from stages.align.config import AlignConfig
    from stages.align.run import discriminator_source, with_reused_shape
    from stages.common.contract.errors import UsageError

    disc = tmp_path / "disc"
    disc.mkdir()
    (disc / "config.json").write_text(json.dumps({
        "model_type": "qwen3_vl_moe", "text_config": {"num_experts": 8, "num_experts_per_tok": 1},
        "prism_discriminator": {"variant": "moe", "text_only": False}}))

    def cfg(**flags):
        return config.resolve(AlignConfig, flags=dict(ckpt="tiny", data=["synth:train:4"], disc=str(disc),
                                                      out=str(tmp_path / "align"), **flags))

    kept = with_reused_shape(cfg(), discriminator_source(cfg(), None))
    assert (kept.num_experts, kept.top_k) == (8, 1)
    assert "reused with its own shape (num_experts 8, top_k 1)" in capsys.readouterr().err
    with pytest.raises(UsageError, match=r"is reused as it is \(num_experts 8\); it cannot take num_experts 6"):
        with_reused_shape(cfg(num_experts=6), discriminator_source(cfg(), None))


def test_training_dtype_on_a_cpu_is_fp32_and_says_so(monkeypatch, capsys):
    from stages.common.training import runtime as training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.training_dtype("auto") == "auto" and training.training_dtype("fp32") == "fp32"
    assert training.training_dtype("bf16") == "fp32"
    assert "--dtype bf16 has no effect on a CPU: training runs in fp32" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training.training_dtype("bf16") == "bf16"


@pytest.mark.parametrize("stage", ["rl", "eval"])
def test_vllm_engine_on_a_cpu_names_a_real_option_and_writes_nothing(stage, tmp_path):
    from typer.testing import CliRunner

    from prism_cli.app import app
    from stages.common.rollout import ENGINES

    if ENGINES.get("vllm").usable():
        pytest.skip("vLLM runs on this machine")
    out = tmp_path / stage
    args = [stage, "--ckpt", "tiny", "--engine", "vllm", "--out", str(out)]
    args += ["--data", "synth:train:4"] if stage == "rl" else ["--tasks", "synth", "--synth", "synth:test:2"]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "rollout engine vllm needs" in lines[0] and "use --engine hf" in lines[0]
    assert not out.exists()


def test_an_unwritable_prism_home_is_named_as_such_not_as_out(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from prism_cli.app import app

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("PRISM_HOME", str(blocker / "home"))   # nothing can be created under a file
    out = tmp_path / "sft"
    result = CliRunner().invoke(app, ["sft", "--ckpt", "tiny", "--data", "synth:train:8", "--max-steps", "1",
                                      "--batch-size", "4", "--micro-batch-size", "4", "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert f"cannot build the tiny model in PRISM_HOME ({blocker / 'home'})" in lines[0]
    assert "--out" not in lines[0] and not out.exists()


def test_help_at_80_columns_shows_every_option_name_whole():
    import dataclasses

    from typer.testing import CliRunner

    from prism_cli.app import STAGES, _import, app

    for stage, (config_path, _, _) in STAGES.items():
        result = CliRunner().invoke(app, [stage, "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
        assert result.exit_code == 0, result.output
        assert "…" not in result.output, f"prism {stage} --help cuts text at 80 columns:\n{result.output}"
        for f in dataclasses.fields(_import(config_path)):
            if (f.metadata or {}).get("cli", True):
                flag = (f.metadata or {}).get("flag") or "--" + f.name.replace("_", "-")
                shown = flag.replace("--", "--no-", 1) if f.default is True else flag
                assert shown in result.output, f"prism {stage} --help lacks {shown}"


def test_switches_reach_the_config(monkeypatch):
    from typer.testing import CliRunner

    from prism_cli import app as app_module
    from stages.common.contract.errors import UsageError

    seen = {}

    def capture(cls, config_file=None, flags=None, sets=None):
        seen.update(flags)
        raise UsageError("captured")

    monkeypatch.setattr(app_module.cfgmod, "resolve", capture)
    for args, want in ((["export", "--no-verify"], {"verify": False}), (["sft", "--freeze-vision"], {"freeze_vision": True}),
                       (["rl", "--no-dynamic-sampling"], {"dynamic_sampling": False}),
                       (["rl", "--dynamic-sampling"], {"dynamic_sampling": True}),
                       (["align", "--disc-grad-checkpointing", "off"], {"disc_gradient_checkpointing": "off"})):
        seen.clear()
        CliRunner().invoke(app_module.app, args)
        assert seen == want, (args, seen)


def test_deepspeed_is_told_the_accelerator_so_it_does_not_warn_after_every_stage(monkeypatch):
    """save_pretrained imports DeepSpeed; without DS_ACCELERATOR it warns "Setting accelerator to CPU"."""
    import os

    from stages.common.training import runtime as training
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: DeepSpeed finds CUDA itself")
    monkeypatch.setenv("DS_ACCELERATOR", "")      # recorded, so the test's own setting is undone after it
    monkeypatch.delenv("DS_ACCELERATOR")
    training.make_runtime("auto")
    assert os.environ.get("DS_ACCELERATOR") == "cpu"
