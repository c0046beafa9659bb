"""`python3 benchmarks/device/peak.py ARGS...` runs `prism ARGS...` in this process and, when it exits (success
or not), writes its peak memory as JSON to the file named by $PRISM_DEVICE_PEAK: the peak resident set and,
on a GPU, torch.cuda.max_memory_allocated / max_memory_reserved. No stage code is touched for this.

With $PRISM_DEVICE_PLAN set, the same command's `--dry-run` (backend none, 80 GiB) runs first in this process
and its output goes to that file: the plan beside the measurement for the price of one process start-up (the
dry run builds the model on the meta device, so it adds nothing to the peak)."""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path


def _write_peak() -> None:
    peak = {"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        peak["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved()
    Path(os.environ["PRISM_DEVICE_PEAK"]).write_text(json.dumps(peak))


def _write_plan(args: list[str], path: Path) -> None:
    import contextlib
    import io

    from prism_cli.app import app

    buffer, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            app(args=[*args, "--dry-run", "--backend", "none", "--gpu-memory", "80GiB"], prog_name="prism")
        except SystemExit as e:
            code = e.code or 0
    path.write_text(json.dumps({"rc": code, "output": buffer.getvalue()}))


if __name__ == "__main__":
    if "PRISM_DEVICE_PLAN" in os.environ:
        _write_plan(sys.argv[1:], Path(os.environ["PRISM_DEVICE_PLAN"]))
    if "PRISM_DEVICE_PEAK" in os.environ:
        atexit.register(_write_peak)
    from prism_cli.app import main

    sys.argv = ["prism", *sys.argv[1:]]
    main()
