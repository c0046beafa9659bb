"""Test-wide setup: one torch thread, offline hub, tiny models cached once per machine."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PRISM_NO_PROGRESS"] = "1"
# prism's consoles are made once, at import, at the width COLUMNS gives (80 where no terminal is attached), so
# a long tmp path (pytest-xdist's worker folders add to it) wraps a message mid-phrase; tests read messages
# whole. A test of narrow output sets COLUMNS on its own invocation (the --help-at-80-columns test does).
os.environ.setdefault("COLUMNS", "200")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The learning tests (marker `learning`) train from this seed; benchmarks/learning_spread.py reruns them at other
# seeds and kernel paths and reads what they record (record_learning), to measure the spread their bars rely on.
LEARNING_SEED = int(os.environ.get("PRISM_LEARNING_SEED", "0"))


@pytest.fixture
def record_learning(request):
    """record(name, value, bar, above=True): one statistic a learning test asserts against its bar, appended to
    $PRISM_LEARNING_RECORD (a JSON-lines file) when set. Call it before the assertion, so a failing seed is
    recorded too."""
    import json

    def record(name: str, value: float, bar: float, above: bool = True) -> None:
        path = os.environ.get("PRISM_LEARNING_RECORD")
        if not path:
            return
        row = {"test": request.node.nodeid, "name": name, "value": float(value), "bar": float(bar), "above": above,
               "seed": LEARNING_SEED, "kernels": os.environ.get("ATEN_CPU_CAPABILITY", "unset"),
               "capability": torch.backends.cpu.get_cpu_capability()}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    return record


def pytest_runtest_makereport(item, call):
    """CI lists markers whose tests must not skip (PRISM_CI_NO_SKIP=slow,needs_root): such a skip is a failure,
    so a suite that claims to run the README demo or the root-only fault tests cannot quietly pass without them."""
    forbidden = {m for m in os.environ.get("PRISM_CI_NO_SKIP", "").split(",") if m}
    if not forbidden or call.excinfo is None or call.excinfo.typename != "Skipped":
        return None
    marked = forbidden & {m.name for m in item.iter_markers()}
    if not marked:
        return None
    from _pytest.reports import TestReport

    report = TestReport.from_item_and_call(item, call)
    report.outcome = "failed"
    report.longrepr = (f"{item.nodeid} is marked {sorted(marked)} and PRISM_CI_NO_SKIP forbids skipping it: "
                       f"{call.excinfo.value}")
    return report


@pytest.fixture(scope="session")
def tiny_path():
    from stages.common.world import tiny
    return tiny.ensure("tiny")


@pytest.fixture(scope="session")
def tiny_moe_path():
    from stages.common.world import tiny
    return tiny.ensure("tiny-moe")


@pytest.fixture(scope="session")
def tiny_qwen_path():
    """The real-interface tiny Qwen3-VL (real tokenizer, stock template); needs the Qwen2 vocabulary that
    .ci/setup-venv installs (stages.common.world.qwen_vocab)."""
    from stages.common.world import tiny
    return tiny.ensure("tiny-qwen")


def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process test's rendezvous: CI runs two test workers side
    by side (pytest-xdist), so a fixed port can collide with the other worker's launch."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(config_cls, run_fn, **flags):
    """Run a stage in-process with a resolved config (what the CLI does after parsing options)."""
    from stages.common.contract import config
    return run_fn(config.resolve(config_cls, flags=flags))


def interrupt_at_call(monkeypatch, module, name: str, call: int):
    """Make module.name raise KeyboardInterrupt (Ctrl-C) at its call-th call; returns the real function, to put back
    with monkeypatch.setattr before resuming."""
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    return real


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory, tiny_path):
    """The tiny model after a short SFT on synth with oracle demonstrations: it has learnt the response
    format (the starting point of the rl/align/eval tests): 200 steps, where greedy decoding is reliably
    format-valid (at 90 steps it still loops). About two minutes on one quiet thread."""
    from stages.sft.config import SFTConfig
    from stages.sft.run import run

    out = tmp_path_factory.mktemp("pipeline") / "sft"
    return run_stage(SFTConfig, run, ckpt="tiny", data=["synth:train:1024"], out=str(out), lr=3e-3,
                     batch_size=16, micro_batch_size=8, max_steps=200, warmup=0.05, eval_every=50,
                     save_every=1000, seed=LEARNING_SEED)
