"""`prism export`: a plain HF folder that reloads to the same logits, with lineage; refusals of bad inputs."""

import json
import shutil

import pytest
import torch

from stages.common.contract import checkpoint
from stages.common.contract.config import resolve
from stages.common.contract.errors import PrismError, UsageError
from stages.export.config import ExportConfig
from stages.export.run import probe_inputs, run


def export_config(**flags):
    return resolve(ExportConfig, flags={"ckpt": "tiny", **flags})


@pytest.fixture(scope="module")
def sft_like(tmp_path_factory, tiny_path):
    """A finished prism checkpoint (stage sft) whose model/ is the tiny model, with an eval beside it."""
    root = tmp_path_factory.mktemp("ckpts")
    run_dir = checkpoint.open_output(str(root / "sft"), "sft", {"lr": 1e-5, "epochs": 1, "data": ["synth"]},
                                     [("policy", checkpoint.resolve("tiny"))])
    shutil.copytree(tiny_path, run_dir.model_dir, ignore=shutil.ignore_patterns(".complete"))
    run_dir.finalize(summary={"loss": 1.0}, data={"synth": "fingerprint-abc"})
    (root / "eval-sft").mkdir()
    (root / "eval-sft" / "results.json").write_text(json.dumps(
        {"tasks": {"synth": {"value": 0.42}}, "average": 0.42, "judge": "none"}))
    return root / "sft"


def test_fp32_export_round_trip_same_logits(sft_like, tmp_path):
    out = run(export_config(ckpt=str(sft_like), out=str(tmp_path / "hf"), dtype="fp32"))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "chat_template.jinja", "README.md", "prism_lineage.json",
            "tokenizer.json", "processor_config.json"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    assert "prism.json" not in files and "state" not in files and not (tmp_path / "hf.exporting").exists()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.common.models.loading import load_policy

    original = load_policy(str(sft_like), dtype="fp32", device=torch.device("cpu"), train=False)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = probe_inputs(AutoProcessor.from_pretrained(out))
    with torch.inference_mode():
        assert torch.equal(original(**inputs).logits, reloaded(**inputs).logits)

    lineage = json.loads((out / "prism_lineage.json").read_text())
    assert [r["stage"] for r in lineage["lineage"]] == ["sft", "base"]
    assert lineage["lineage"][0]["hyperparameters"]["lr"] == 1e-5
    assert lineage["lineage"][0]["data"] == {"synth": "fingerprint-abc"}
    assert lineage["verification"]["max_abs_logit_diff"] == 0.0 and lineage["verification"]["generated_tokens"] > 0
    card = (out / "README.md").read_text()
    assert "| sft |" in card and "fingerprint-abc" in card and "| synth |" in card.replace("| eval | synth", "| synth |")
    assert "42.0" in card and "AutoModelForImageTextToText" in card
    assert "SYSTEM_PROMPT = " in card  # an sft policy: the usage snippet prompts it as it was trained
    run_usage_snippet(card, out, tmp_path)
    # transformers 4.57 (the last 4.x) reads M-RoPE from rope_scaling and wants a mapping of extra special
    # tokens; both were checked by hand to load this folder there with the same logits (docs/first-hour.md)
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text["rope_scaling"]["mrope_section"] == text["rope_parameters"]["mrope_section"]
    assert text["rope_theta"] == text["rope_parameters"]["rope_theta"]
    assert json.loads((out / "tokenizer_config.json").read_text()).get("extra_special_tokens", {}) == {}
    assert "transformers >= 4.57" in card


def run_usage_snippet(card: str, folder, tmp_path) -> None:
    """The card's usage snippet, run as a user would (on a synth image): it prints the response only."""
    import contextlib
    import io

    from stages.common.world import synth
    sample = synth.load("synth:test:1")[0]
    image = tmp_path / "problem.png"
    sample.pil_images()[0].save(image)
    snippet = card.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    snippet = (snippet.replace("PATH_OR_REPO", str(folder)).replace("problem.png", str(image))
               .replace("max_new_tokens=512", "max_new_tokens=8"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "usage", "exec"), {})
    text = printed.getvalue()
    assert "How many" not in text and "system" not in text and "user" not in text, text


def test_bf16_export_is_sharded_and_bf16(tmp_path, tiny_path):
    out = run(export_config(out=str(tmp_path / "hf"), max_shard_size="1MB"))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    from safetensors import safe_open

    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16


def test_bad_inputs(tmp_path, tiny_path):
    with pytest.raises(PrismError, match="does not exist"):
        run(export_config(ckpt=str(tmp_path / "missing"), out=str(tmp_path / "a")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(PrismError, match="non-empty folder that is not a prism export"):
        run(export_config(out=str(tmp_path / "full")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PrismError, match="cannot"):
        run(export_config(out=str(blocker / "sub")))
    with pytest.raises(PrismError, match="'base' checkpoint; this stage needs 'align'"):
        run(export_config(out=str(tmp_path / "d"), what="discriminator"))
    with pytest.raises(UsageError):
        export_config(out="x", dtype="int8")
    with pytest.raises(UsageError):
        resolve(ExportConfig, flags={"ckpt": "tiny"})  # no --out


def test_push_without_network_is_one_clear_error(tmp_path, tiny_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrismError, match="cannot push to me/model") as info:
        run(export_config(out=str(tmp_path / "hf"), push_to_hub="me/model", verify=False))
    assert "export is complete" in info.value.hint and (tmp_path / "hf" / "config.json").is_file()


def test_model_card_usage_shows_the_trained_system_prompt():
    """The policy is trained with the protocol system prompt; a usage snippet without it gets answers
    without the protocol (issue 19). A base model that prism never trained gets no system prompt."""
    from stages.common.protocol import SYSTEM_PROMPT
    from stages.export import model_card

    trained = [{"stage": "rl", "ref": "out/rl", "fingerprint_ok": True},
               {"stage": "sft", "ref": "out/sft", "fingerprint_ok": True, "system_prompt": True},
               {"stage": "base", "ref": "tiny", "fingerprint_ok": True}]
    prompt = model_card.trained_system_prompt(trained)
    assert prompt == SYSTEM_PROMPT
    card = model_card.render("m", "policy", "bf16", trained, [], {}, prompt)
    usage = card[card.index("## Usage"):]
    assert json.dumps(SYSTEM_PROMPT) in usage and '{"role": "system", "content": SYSTEM_PROMPT}' in usage
    snippet = usage.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "usage", "exec")  # the snippet is valid Python
    namespace = {}
    exec(next(line for line in snippet.splitlines() if line.startswith("SYSTEM_PROMPT = ")), namespace)
    assert namespace["SYSTEM_PROMPT"] == SYSTEM_PROMPT

    sft_without = [{"stage": "sft", "ref": "s", "system_prompt": False}, {"stage": "base", "ref": "tiny"}]
    assert model_card.trained_system_prompt(sft_without) is None
    assert model_card.trained_system_prompt([{"stage": "base", "ref": "tiny"}]) is None
    assert "SYSTEM_PROMPT" not in model_card.render("m", "policy", "bf16", sft_without, [], {}, None)
