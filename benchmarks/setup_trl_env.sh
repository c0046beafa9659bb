#!/usr/bin/env bash
# Benchmark-only environment for the prism-vs-trl comparisons (benchmarks/sft_vs_trl.py, rl_vs_trl.py).
# trl is NOT a prism dependency: it lives here only, in benchmarks/envs/trl (git-ignored). The environment is
# CI's own, installed from the lock (.ci/setup-venv), plus trl alone: trl is installed against the same lock,
# so torch, transformers, accelerate and datasets are the versions CI tests, on both sides of every comparison.
# The script fails if trl's install moved any package the lock pins, or brought one the lock lacks.
#
#   bash benchmarks/setup_trl_env.sh            # create or refresh benchmarks/envs/trl
#   PYTHON=python3.11 bash benchmarks/setup_trl_env.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
ENV="${TRL_ENV:-$HERE/envs/trl}"
LOCK="$ROOT/.ci/constraints.txt"
TRL_VERSION="1.16.0"   # the version the shared trl baseline was measured with

"$ROOT/.ci/setup-venv" "$ENV" test
"$ENV/bin/python" -m uv pip install --quiet --python "$ENV/bin/python" -c "$LOCK" "trl==$TRL_VERSION"
"$ENV/bin/python" - "$LOCK" <<'PY'
import re, sys
import importlib.metadata as md
pins = {}
for line in open(sys.argv[1]):
    m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
    if m:
        pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
allowed = {"pip", "setuptools", "uv", "prism-vlm", "trl"}
bad = []
for dist in md.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    want = pins.get(name)
    if name in allowed:
        continue
    if want is None:
        bad.append(f"{name} {dist.version} (not in the lock: trl brought it)")
    elif want.split("+")[0] != dist.version.split("+")[0]:
        bad.append(f"{name} {dist.version} (lock says {want})")
if bad:
    sys.exit("error: benchmarks/envs/trl is not the lock plus trl: " + "; ".join(sorted(bad)))
print("benchmarks/envs/trl: the lock plus trl;", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "torchvision", "transformers", "trl", "accelerate", "datasets", "prism-vlm")))
PY
