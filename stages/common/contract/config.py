"""Stage configs are flat dataclasses, resolved as: defaults < --config YAML < CLI flags < --set key=value.

Every layer is checked against the dataclass: an unknown key or a value of the wrong type is a
UsageError naming the key, so a typo in a 500-step paper run fails in the first second, not at step 400.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from stages.common.contract import tracking
from stages.common.contract.errors import UsageError


def opt(default=dataclasses.MISSING, help: str = "", group: str = "Options", flag: str | None = None,
        cli: bool = True, factory=None):
    """A config field with what the CLI needs: help text, the --help panel it appears in, its flag.

    cli=False keeps a field reachable only through YAML and --set (rarely changed knobs).
    """
    meta = {"help": help, "group": group, "flag": flag, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class CommonConfig:
    """Fields every stage has. Stage configs inherit these so the CLI can treat them alike."""

    out: str = opt("", "output checkpoint directory", group="Output")
    seed: int = opt(0, "random seed (data order, sampling, init)", group="Output")
    overwrite: bool = opt(False, "replace a complete output directory", group="Output")
    resume: bool = opt(False, "continue a partial output directory from its state/", group="Output")
    dry_run: bool = opt(False, "validate the config, print the resolved plan, run nothing", group="Output")


@dataclasses.dataclass
class HardwareConfig:
    """The hardware section every training stage offers, defined once so the stages cannot drift apart:
    the same keys, flags, choices and help in sft, rl and align. Stage configs inherit it after CommonConfig
    (`class RLConfig(HardwareConfig, CommonConfig)`); the plan options are checked by each stage's validate
    (stages.common.plan.report.check_plan_options, a floor above this one)."""

    dtype: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32", group="Hardware")
    attn: str = opt("auto", "the policy's attention: auto (flash_attention_2 on GPU if installed, else sdpa), sdpa, "
                            "flash_attention_2, eager", group="Hardware")
    gradient_checkpointing: bool = opt(False, "recompute the policy's activations in backward (saves memory)",
                                       group="Hardware")
    freeze_vision: bool = opt(False, "keep the policy's vision tower frozen", group="Hardware")
    gpu_memory: str = opt("80GiB", "--dry-run: memory of one GPU, for the plan's verdict", group="Hardware")
    backend: str = opt("auto", "--dry-run plan backend: auto (from the accelerate launch), none, ddp, zero2, zero3, "
                               "fsdp2, offload", group="Hardware")
    world_size: int = opt(0, "--dry-run plan: number of GPUs (0: the launch's WORLD_SIZE)", group="Hardware")


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _to_bool(key: str, value: Any, from_text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise UsageError(f"config key '{key}' expects true/false, got {value!r}")


def _to_int(key: str, value: Any, from_text: bool) -> int:
    if isinstance(value, bool):
        raise UsageError(f"config key '{key}' expects an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if from_text and isinstance(value, str):
        try:
            f = float(value)
            if f.is_integer():
                return int(f)
        except ValueError:
            pass
    raise UsageError(f"config key '{key}' expects an integer, got {value!r}")


def _to_float(key: str, value: Any, from_text: bool) -> float:
    if isinstance(value, bool):
        raise UsageError(f"config key '{key}' expects a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML reads "1e-5" as a string; accept numeric text anywhere
        try:
            return float(value)
        except ValueError:
            pass
    raise UsageError(f"config key '{key}' expects a number, got {value!r}")


def _to_str(key: str, value: Any, from_text: bool) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UsageError(f"config key '{key}' expects a string, got {value!r}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(key: str, value: Any, tp, from_text: bool) -> Any:
    """Check (or, for --set text, parse) one value against a field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a, from_text)
            except UsageError as e:
                errors.append(e)
        raise errors[0] if errors else UsageError(f"config key '{key}': None is not allowed")
    if origin in (list, tuple):
        inner = args[0] if args else str
        if from_text and isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, v, inner, from_text) for v in value]
    if origin is dict or tp is dict:
        if from_text and isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return yaml.safe_load(value) if from_text and isinstance(value, str) else value
    if tp in _SCALARS:
        return _SCALARS[tp](key, value, from_text)
    raise UsageError(f"config key '{key}' has an unsupported type {_type_name(tp)}")


def _unknown_key_hint(key: str, value: Any, hints: dict) -> str:
    import difflib

    close = [n for n in hints if n.replace("_", "") == key.replace("_", "").replace("-", "")]
    close = close or difflib.get_close_matches(key.replace("-", "_"), list(hints), n=1, cutoff=0.75)
    if close:
        return f"did you mean '{close[0]}'?"
    if isinstance(value, dict):  # a nested section (optimizer: {lr: ...}) in a flat config
        inner = [k for k in value if k in hints]
        unknown = [k for k in value if k not in hints]
        if inner:
            return (f"prism configs are flat: put {', '.join(inner)} at the top level"
                    + (f" (and {', '.join(map(str, unknown))} is not a key either)" if unknown else ""))
    return f"see `prism <stage> --help`; valid keys: {', '.join(sorted(hints))}"


def _apply(cls, values: dict, updates: dict, source: str, from_text: bool) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in updates.items():
        if key not in hints:
            raise UsageError(f"unknown config key '{key}' in {source}", hint=_unknown_key_hint(str(key), value, hints))
        values[key] = _coerce(key, value, hints[key], from_text)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--config {p} is a directory, not a YAML file", hint="give the .yaml file in it")
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"malformed YAML in {p}{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {p} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must be a mapping of key: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_sets(sets: list[str] | None) -> dict:
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v   # the last of a key wins: a script's --set can be overridden after it
    return out


def resolve(cls, config_file: str | None = None, flags: dict | None = None, sets: list[str] | None = None):
    """defaults < YAML < flags (only those given: None means 'not given') < --set."""
    values: dict = {}
    if config_file:
        _apply(cls, values, load_yaml(config_file), f"config file {config_file}", from_text=False)
    _apply(cls, values, {k: v for k, v in (flags or {}).items() if v is not None}, "command-line options",
           from_text=False)
    _apply(cls, values, parse_sets(sets), "--set", from_text=True)
    try:
        cfg = cls(**values)
    except TypeError as e:  # a required field with no default was not given
        raise UsageError(str(e)) from None
    check_common(cfg)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


# Lower bounds of knobs several stages share; (bound, inclusive). Checked when a config is resolved, so
# --dry-run refuses them too, instead of a NaN loss or a ZeroDivisionError an hour in.
_BOUNDS = {"max_new_tokens": (1, True), "weight_decay": (0, True), "max_grad_norm": (0, True), "warmup": (0, True),
           "save_every": (1, True), "log_every": (1, True), "eval_every": (1, True),
           "epochs": (0, False), "batch_size": (1, True), "micro_batch_tokens": (1, True), "ppo_epochs": (1, True),
           "mini_batches": (1, True), "kl_coef": (0, True), "max_prompt_chars": (0, True)}


DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


def check_common(cfg) -> None:
    """Rules every stage config obeys: finite numbers, positive learning rates, sane shared bounds, and
    --report-to trackers that exist and are installed."""
    import math

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"config key '{f.name}' is {value}, not a finite number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if (f.name == "lr" or f.name.endswith("_lr")) and value <= 0:
            raise UsageError(f"config key '{f.name}' must be positive, not {value}")
        if f.name in _BOUNDS:
            low, inclusive = _BOUNDS[f.name]
            if value < low or (value == low and not inclusive):
                raise UsageError(f"config key '{f.name}' must be {'at least' if inclusive else 'above'} {low}, "
                                 f"not {value}")
        if f.name == "top_p" and not 0 < value <= 1:
            raise UsageError(f"config key 'top_p' must be in (0, 1], not {value}")
    if getattr(cfg, "dtype", "auto") not in DTYPES:   # --dtype fp8 ran as fp32 on a CPU and failed on a GPU
        raise UsageError(f"unknown --dtype {cfg.dtype!r}", hint="use auto, bf16, fp16 or fp32")
    if getattr(cfg, "max_steps", -1) == 0:   # 0 ran the whole epochs, not none
        raise UsageError("--max-steps 0 would train nothing", hint="give at least 1, or -1 to run the epochs")
    if hasattr(cfg, "report_to"):
        tracking.parse(cfg.report_to)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
