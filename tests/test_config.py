"""Config resolution (stages.common.contract.config): defaults < YAML < flags < --set, checked against the dataclass.

Python level on SFTConfig (and every stage's Config for the per-field checks); the same order through
the CLI is in test_cli.py.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from stages.align.config import AlignConfig
from stages.common.contract import config as cfgmod
from stages.common.contract.config import resolve, to_dict
from stages.common.contract.errors import UsageError
from stages.curate.config import CurateConfig
from stages.eval.config import EvalConfig
from stages.export.config import ExportConfig
from stages.rl.config import RLConfig
from stages.sft.config import SFTConfig

# The fields each stage's validate() requires, so resolve() succeeds.
STAGE_CONFIGS = {
    "curate": (CurateConfig, {"teacher": "oracle"}),
    "sft": (SFTConfig, {}),
    "align": (AlignConfig, {"ckpt": "tiny", "data": ["synth"]}),
    "rl": (RLConfig, {"ckpt": "tiny"}),
    "eval": (EvalConfig, {"ckpt": ["tiny"]}),
    "export": (ExportConfig, {"ckpt": "tiny", "out": "hf/model"}),
}


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# ------------------------------------------------------------------------------------------ the order

def test_defaults_only():
    cfg = resolve(SFTConfig)
    assert cfg == SFTConfig()
    assert cfg.lr == 1e-5 and cfg.batch_size == 32 and cfg.data == ["synth"] and cfg.max_pixels is None


def test_each_layer_wins_over_the_one_before(tmp_path):
    y = write(tmp_path, "lr: 0.5\nbatch_size: 16\nschedule: linear\nseed: 3\nmicro_batch_size: 4\n")
    cfg = resolve(SFTConfig, config_file=y, flags={"lr": 0.25, "batch_size": 8, "seed": None},
                  sets=["lr=0.125"])
    assert cfg.lr == 0.125          # --set > flag > YAML
    assert cfg.batch_size == 8      # flag > YAML
    assert cfg.schedule == "linear"  # YAML > default
    assert cfg.seed == 3            # a flag of None means "not given": YAML stays
    assert cfg.micro_batch_size == 4
    assert cfg.epochs == 1.0        # untouched default


def test_set_wins_over_yaml_without_a_flag(tmp_path):
    y = write(tmp_path, "max_length: 512\n")
    assert resolve(SFTConfig, config_file=y, sets=["max_length=256"]).max_length == 256
    assert resolve(SFTConfig, config_file=y).max_length == 512


def test_last_set_of_the_same_key_wins():
    assert resolve(SFTConfig, sets=["seed=1", "seed=2"]).seed == 2


def test_dashed_keys_in_yaml_and_set(tmp_path):
    y = write(tmp_path, "max-length: 100\n")
    cfg = resolve(SFTConfig, config_file=y, sets=["micro-batch-size=4"])
    assert cfg.max_length == 100 and cfg.micro_batch_size == 4


def test_empty_yaml_is_defaults(tmp_path):
    assert resolve(SFTConfig, config_file=write(tmp_path, "")) == SFTConfig()


# ------------------------------------------------------------------------------ lists, Optional, types

@pytest.mark.parametrize("how", ["flags", "set_commas", "set_yaml_list", "yaml"])
def test_list_valued_field(tmp_path, how):
    want = ["synth:train:8", "out/curated:0.5"]
    if how == "flags":
        cfg = resolve(SFTConfig, flags={"data": list(want)})
    elif how == "set_commas":
        cfg = resolve(SFTConfig, sets=["data=synth:train:8,out/curated:0.5"])
    elif how == "set_yaml_list":
        cfg = resolve(SFTConfig, sets=["data=[synth:train:8, out/curated:0.5]"])
    else:
        cfg = resolve(SFTConfig, config_file=write(tmp_path, "data:\n  - synth:train:8\n  - out/curated:0.5\n"))
    assert cfg.data == want


def test_list_field_rejects_a_mapping(tmp_path):
    with pytest.raises(UsageError, match="'data' expects a list"):
        resolve(SFTConfig, config_file=write(tmp_path, "data: {a: 1}\n"))


@pytest.mark.parametrize("text", ["none", "None", "null", "NULL"])
def test_optional_field_set_to_none(text):
    cfg = resolve(SFTConfig, flags={"max_pixels": 4096}, sets=[f"max_pixels={text}"])
    assert cfg.max_pixels is None


def test_optional_field_values(tmp_path):
    assert resolve(SFTConfig, sets=["max_pixels=4096"]).max_pixels == 4096
    assert resolve(SFTConfig, config_file=write(tmp_path, "min_pixels: 1024\nmax_pixels: null\n")).min_pixels == 1024
    with pytest.raises(UsageError, match="'max_pixels' expects an integer, got 'lots'"):
        resolve(SFTConfig, sets=["max_pixels=lots"])


def test_optional_float_and_bool_of_rl():
    cfg = resolve(RLConfig, flags={"ckpt": "tiny"}, sets=["clip_high=0.3", "dynamic_sampling=false",
                                                          "overlong_buffer=none"])
    assert cfg.clip_high == 0.3 and cfg.dynamic_sampling is False and cfg.overlong_buffer is None
    assert cfg.resolved("overlong_buffer") == 4096  # dapo's default fills the None


@pytest.mark.parametrize("text,want", [("true", True), ("false", False), ("1", True), ("0", False),
                                       ("yes", True), ("No", False)])
def test_bool_from_set(text, want):
    assert resolve(SFTConfig, sets=[f"gradient_checkpointing={text}"]).gradient_checkpointing is want


@pytest.mark.parametrize("text,want", [("7", 7), ("1e3", 1000), ("-1", -1)])
def test_int_from_set(text, want):
    assert resolve(SFTConfig, sets=[f"max_steps={text}"]).max_steps == want


def test_float_from_yaml_scientific_text(tmp_path):
    # PyYAML reads "1e-5" (no dot) as a string; a float field must still take it
    assert resolve(SFTConfig, config_file=write(tmp_path, "lr: 1e-5\nwarmup: 3\n")).lr == 1e-5
    assert resolve(SFTConfig, config_file=write(tmp_path, "warmup: 3\n")).warmup == 3.0


def test_set_value_keeps_equals_signs():
    assert resolve(CurateConfig, flags={"teacher": "oracle"},
                   sets=["gemini_base_url=http://h/x?a=b"]).gemini_base_url == "http://h/x?a=b"


def test_dict_field_from_set_and_yaml(tmp_path):
    cfg = resolve(CurateConfig, flags={"teacher": "oracle"}, sets=["prices={m: {input: 1, output: 2}}"])
    assert cfg.prices == {"m": {"input": 1, "output": 2}}
    with pytest.raises(UsageError, match="'prices' expects a mapping"):
        resolve(CurateConfig, config_file=write(tmp_path, "prices: [1, 2]\nteacher: oracle\n"))


# -------------------------------------------------------------------------------------------- errors

def test_unknown_key_in_each_layer(tmp_path):
    with pytest.raises(UsageError) as e:
        resolve(SFTConfig, config_file=write(tmp_path, "learning_rate: 0.1\n"))
    assert e.value.exit_code == 2
    assert "unknown config key 'learning_rate'" in e.value.message and "cfg.yaml" in e.value.message
    with pytest.raises(UsageError, match="unknown config key 'bogus' in command-line options"):
        resolve(SFTConfig, flags={"bogus": 1})
    with pytest.raises(UsageError, match="unknown config key 'lrr' in --set"):
        resolve(SFTConfig, sets=["lrr=1"])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(UsageError) as e:
        resolve(SFTConfig, sets=["maxsteps=3"])
    assert "did you mean 'max_steps'" in e.value.hint


@pytest.mark.parametrize("layer", ["yaml", "flags", "set"])
@pytest.mark.parametrize("key,bad,expect", [
    ("lr", "fast", "'lr' expects a number, got 'fast'"),
    ("max_steps", "many", "'max_steps' expects an integer, got 'many'"),
    ("freeze_vision", "maybe", "'freeze_vision' expects true/false, got 'maybe'"),
])
def test_wrong_type_in_each_layer(tmp_path, layer, key, bad, expect):
    with pytest.raises(UsageError) as e:
        if layer == "yaml":
            resolve(SFTConfig, config_file=write(tmp_path, f"{key}: {bad}\n"))
        elif layer == "flags":
            resolve(SFTConfig, flags={key: bad})
        else:
            resolve(SFTConfig, sets=[f"{key}={bad}"])
    assert e.value.exit_code == 2
    assert expect in e.value.message


@pytest.mark.parametrize("yaml_text,expect", [
    ("max_steps: 1.5\n", "'max_steps' expects an integer, got 1.5"),
    ("max_steps: true\n", "'max_steps' expects an integer, got True"),
    ("lr: false\n", "'lr' expects a number, got False"),
    ("schedule: [a]\n", "'schedule' expects a string, got ['a']"),
    ("freeze_vision: 2\n", "'freeze_vision' expects true/false, got 2"),
    ("data: [[1]]\n", "'data' expects a string, got [1]"),
])
def test_wrong_yaml_types(tmp_path, yaml_text, expect):
    with pytest.raises(UsageError) as e:
        resolve(SFTConfig, config_file=write(tmp_path, yaml_text))
    assert expect in e.value.message


def test_malformed_yaml_names_file_and_line(tmp_path):
    y = write(tmp_path, "lr: 0.1\ndata: [synth\nseed: 1\n")
    with pytest.raises(UsageError) as e:
        resolve(SFTConfig, config_file=y)
    assert e.value.message.startswith(f"malformed YAML in {y} at line ")
    assert "\n" not in e.value.message


def test_yaml_not_a_mapping(tmp_path):
    with pytest.raises(UsageError, match="must be a mapping of key: value, got list"):
        resolve(SFTConfig, config_file=write(tmp_path, "- lr\n- 0.1\n"))


def test_yaml_not_utf8(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"lr: \xff\xfe\n")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        resolve(SFTConfig, config_file=str(p))


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        resolve(SFTConfig, config_file=str(tmp_path / "nope.yaml"))


def test_set_without_equals():
    with pytest.raises(UsageError, match="--set expects key=value, got 'lr'"):
        resolve(SFTConfig, sets=["lr"])


def test_validate_runs_after_resolution():
    with pytest.raises(UsageError, match="batch_size 10 must be a multiple of micro_batch_size 8"):
        resolve(SFTConfig, sets=["batch_size=10"])
    with pytest.raises(UsageError, match="unknown schedule 'cosmic'"):
        resolve(SFTConfig, flags={"schedule": "cosmic"})


# ------------------------------------------------------------------------------- every stage's Config

def _as_set_text(value) -> str:
    """How a user would write this value after --set key=."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_stage_config_resolves_and_serialises(stage):
    cls, required = STAGE_CONFIGS[stage]
    assert issubclass(cls, cfgmod.CommonConfig)
    cfg = resolve(cls, flags=required)
    plain = to_dict(cfg)
    assert json.loads(json.dumps(plain)) == plain  # goes into prism.json as is
    for name in ("out", "seed", "overwrite", "resume", "dry_run"):
        assert name in plain


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_every_field_has_help_and_a_settable_type(stage):
    """Each field documents itself and its default round-trips through --set text."""
    cls, required = STAGE_CONFIGS[stage]
    base = resolve(cls, flags=required)
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        value = getattr(base, f.name)
        again = resolve(cls, flags=required, sets=[f"{f.name}={_as_set_text(value)}"])
        assert getattr(again, f.name) == value, f"{cls.__name__}.{f.name}: --set of {value!r} changed it"


@pytest.mark.parametrize("stage", list(STAGE_CONFIGS))
def test_unknown_key_is_refused_by_every_stage(stage):
    cls, required = STAGE_CONFIGS[stage]
    with pytest.raises(UsageError, match="unknown config key 'not_a_key' in --set"):
        resolve(cls, flags=required, sets=["not_a_key=1"])


def test_field_types_are_ones_the_resolver_knows():
    known = (int, float, str, bool, dict)
    for cls, _ in STAGE_CONFIGS.values():
        for name, tp in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            inner = args[0] if args else tp
            if typing.get_origin(inner) is list:
                inner = typing.get_args(inner)[0]
            assert inner in known, f"{cls.__name__}.{name}: {tp}"


def test_every_training_stage_offers_the_same_hardware_section():
    """One definition (HardwareConfig): sft, rl and align have the same hardware keys, defaults, help and panel
    (the copies had drifted: only sft's help offered fp16)."""
    import dataclasses

    from stages.align.config import AlignConfig
    from stages.common.contract.config import HardwareConfig
    from stages.rl.config import RLConfig
    from stages.sft.config import SFTConfig

    section = {f.name: (f.default, dict(f.metadata)) for f in dataclasses.fields(HardwareConfig)}
    assert {"dtype", "attn", "gradient_checkpointing", "freeze_vision", "gpu_memory", "backend", "world_size"} \
        == set(section)
    assert "fp16" in section["dtype"][1]["help"]
    for cls in (SFTConfig, RLConfig, AlignConfig):
        fields = {f.name: (f.default, dict(f.metadata)) for f in dataclasses.fields(cls)}
        assert {k: fields[k] for k in section} == section, cls.__name__
