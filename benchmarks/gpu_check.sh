#!/usr/bin/env bash
# One command: bf16 SFT, RL (hf engine) and align steps on a random-weight Qwen3-VL-2B shape, step times,
# MFU and peak memory against the memory plan, as JSON (benchmarks/results/gpu_check.json on a GPU).
# On a machine without CUDA (CI) it runs the same code on a shrunken shape in seconds (--mode cpu).
#   bash benchmarks/gpu_check.sh                 # GPU: under 8 minutes on one H100/H200
#   bash benchmarks/gpu_check.sh --mode cpu --out /tmp/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
# The lent GPU image has python3 and no `python`.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python || command -v python3); fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
args=("$@")
if ! printf '%s\n' "${args[@]:-}" | grep -q -- '--out'; then
    if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        args+=(--out benchmarks/results/gpu_check.json)
    fi
fi
exec "$PYTHON" benchmarks/gpu_check.py "${args[@]}"
