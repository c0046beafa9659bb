#!/usr/bin/env bash
# Sourced by the tiny recipes (tiny.sh, ablation-tiny.sh) after they set ROOT: picks an interpreter that
# can import prism (else builds $ROOT/.venv with the CI script), defines `prism`, and keeps everything
# offline and single-threaded.
set -euo pipefail

PY=${PYTHON:-python3}
importable() { (cd / && "$1" -c "import prism_cli, stages, torch, torchvision, transformers") >/dev/null 2>&1; }
if ! importable "$PY"; then
  PY=$ROOT/.venv/bin/python
  if ! importable "$PY"; then
    echo "prism is not importable: setting up $ROOT/.venv (.ci/setup-venv .venv test)"
    "$ROOT/.ci/setup-venv" "$ROOT/.venv" test
  fi
fi
prism() { "$PY" -m prism_cli "$@"; }
# This checkout's code for every python the recipe starts (the table scripts too), even where the interpreter has
# prism installed from another checkout (an ablation run from a snapshot once built its table with the wrong one).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Everything in these recipes is local (tiny models, synth data, oracle teacher): never reach for the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One thread per process: the tiny model's matrices are too small to gain from more, and on a shared
# 2-core machine extra threads only contend.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
