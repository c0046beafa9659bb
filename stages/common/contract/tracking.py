"""Experiment trackers (`--report-to tensorboard,wandb`) through accelerate.

Names are checked when the config is resolved (so --dry-run catches a typo or a missing package);
`start` opens the trackers on the main process with a config the trackers accept (tensorboard's
hparams take only scalars, so lists become "a,b" and None "none"); `log` sends a step's numeric
metrics. Tracker files live inside the run's --out (out/prism-<stage>/ for tensorboard, out/wandb/
for wandb), so they travel with the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

from dataclasses import dataclass
from typing import Callable

from stages.common.contract.errors import UsageError
from stages.common.contract.registry import Registry

@dataclass(frozen=True)
class Tracker:
    module: str                                   # what must import for it to log anything
    package: str                                  # what to pip install
    ready: Callable[[], str | None] = lambda: None  # a reason it would fail when it starts, or None
    init_kwargs: Callable[[str, str], dict] = lambda out, stage: {}   # accelerate's per-tracker init arguments
    ready_hint: str = ""                          # what to do when ready() gives a reason


def _wandb_ready() -> str | None:
    if wandb_logged_in():
        return None
    return (f"no wandb login on this machine (no WANDB_API_KEY, no {_wandb_host()} entry in ~/.netrc), so wandb "
            "would stop the run when it starts")


# accelerate's tracker names, one row each
TRACKERS: Registry[Tracker] = Registry("tracker", "--report-to")
TRACKERS.register("tensorboard", Tracker("tensorboard", "tensorboard"))
TRACKERS.register("wandb", Tracker("wandb", "wandb", _wandb_ready,
                                   lambda out, stage: {"dir": str(out), "name": f"prism-{stage}"},
                                   "run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline to log to files only"))
for _name, _package in (("mlflow", "mlflow"), ("comet_ml", "comet-ml"), ("aim", "aim"), ("clearml", "clearml"),
                        ("dvclive", "dvclive"), ("swanlab", "swanlab"), ("trackio", "trackio")):
    TRACKERS.register(_name, Tracker(_name, _package))

def parse(report_to: str | None) -> list[str]:
    """The tracker names in a --report-to value ("none" -> []); unknown names, trackers whose package
    is not installed and trackers that would fail when they start are a UsageError naming them."""
    names = [n.strip().lower() for n in str(report_to or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if "none" in names:
        raise UsageError(f"--report-to {report_to!r}: 'none' cannot be combined with trackers")
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"--report-to: unknown tracker {name!r}",
                             hint=f"use none or a comma list of {', '.join(TRACKERS.names())}")
        tracker = TRACKERS.get(name)
        if importlib.util.find_spec(tracker.module) is None:
            raise UsageError(f"--report-to {name}: the {tracker.package} package is not installed, so nothing would "
                             f"be logged", hint=f"pip install {tracker.package}, or --report-to none")
    for name in names:
        tracker = TRACKERS.get(name)
        why = tracker.ready()
        if why:
            raise UsageError(f"--report-to {name}: {why}", hint=tracker.ready_hint or None)
    return names


def _wandb_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def wandb_logged_in() -> bool:
    """What wandb.init will find without asking (it cannot ask in a job): an offline/disabled mode, an API
    key or identity token in the environment, or a netrc entry for the wandb host. Never reads a key out."""
    import netrc
    from pathlib import Path

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    candidates = ([Path(os.environ["NETRC"]).expanduser()] if os.environ.get("NETRC")
                  else [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()])
    for path in candidates:
        try:
            if netrc.netrc(str(path)).authenticators(_wandb_host()):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def clean_config(config: dict) -> dict:
    """A config trackers can store: scalars as they are, None as "none", lists as "a,b", mappings as JSON."""
    out = {}
    for key, value in config.items():
        if value is None:
            out[key] = "none"
        elif isinstance(value, bool | int | float | str):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            out[key] = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            out[key] = json.dumps(value, sort_keys=True, default=str)
        else:
            out[key] = str(value)
    return out


def numeric(record: dict) -> dict:
    """The finite numbers of a metrics record (trackers reject None, strings and lists)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def start(accelerator, stage: str, config: dict, report_to: str, out: str) -> None:
    """Open the trackers (main process; accelerate skips the others) for one stage run."""
    names = parse(report_to)
    if not names:
        return
    init_kwargs = {name: kwargs for name in names if (kwargs := TRACKERS.get(name).init_kwargs(out, stage))}
    accelerator.init_trackers(f"prism-{stage}", config=clean_config(config), init_kwargs=init_kwargs)


def log(accelerator, report_to: str, record: dict, step: int) -> None:
    if str(report_to or "none").strip().lower() != "none":
        accelerator.log(numeric(record), step=step)
