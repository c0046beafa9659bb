#!/usr/bin/env bash
# Benchmark-only environment for the prism-vs-trl comparisons (benchmarks/sft_vs_trl.py, rl_vs_trl.py).
# trl is NOT a prism dependency: it lives here only, in benchmarks/envs/trl (git-ignored). prism is
# installed editable into the same venv so both sides run on identical torch/transformers versions.
#
#   bash benchmarks/setup_trl_env.sh            # create or refresh benchmarks/envs/trl
#   PYTHON=python3.11 bash benchmarks/setup_trl_env.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
ENV="$HERE/envs/trl"
PY="${PYTHON:-python3}"

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
TRL_VERSION="1.16.0"   # the version the shared trl baseline was measured with

if [ ! -x "$ENV/bin/python" ]; then
  "$PY" -m venv "$ENV"
fi
"$ENV/bin/python" -m pip install -q --upgrade pip
"$ENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
"$ENV/bin/python" -m pip install -q -e "$ROOT"
"$ENV/bin/python" -m pip install -q "trl==$TRL_VERSION"
"$ENV/bin/python" - <<'PY'
import importlib.metadata as md
print("benchmarks/envs/trl:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "torchvision", "transformers", "trl", "accelerate", "prism-vlm")))
PY
