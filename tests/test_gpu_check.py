"""benchmarks/gpu_check.sh in its CPU mode (what CI runs): every stage's step runs and reports its time and
its peak memory beside the plan's."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--mode", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "cpu" and set(result["stages"]) == {"sft", "rl", "align_discriminator"}
    for name, stage in result["stages"].items():
        assert stage["step_s"] > 0 and stage["tokens"] > 0, name
        assert stage["peak_gib"] > 0 and stage["plan_gib"] > 0, name
    assert result["stages"]["rl"]["rollout_s"] > 0 and result["stages"]["rl"]["update_s"] > 0
    assert result["discriminator_params"] > result["policy_params"]      # 4 experts per MLP
