#!/usr/bin/env bash
# Rehearse the device command (benchmarks/device/run.sh) on this CPU: a fresh venv holding only what the lent
# GPU image holds at the image's versions (torch and torchvision stand in for 2.11.0+cu130 / 0.26.0 with the
# project's verified pair, .ci/torch-pair.txt), plus the kit from kit.sh, then the same command in its CPU
# mode (shrunken shapes). It fails if anything the command imports is missing or any step fails; its last
# line is the summary of the figures. matplotlib is left out on purpose: a stage without it must still write
# its checkpoint (a warning instead of a plot).
#   bash benchmarks/device/rehearse.sh        # REHEARSAL_HOME (default ~/.cache/prism-rehearsal) keeps the venv
# uv (when importable or on PATH) installs from its cache in seconds; else pip does.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
start=$(date +%s)
home=${REHEARSAL_HOME:-$HOME/.cache/prism-rehearsal}
venv=$home/venv
mkdir -p "$home"
# The image's versions (docs/gpu-check.md) of what the command imports; numpy stays unpinned (the image's 2.5.2
# needs Python 3.12, and the local torch wheels are for this machine's 3.11).
torch_pair=$(grep -E '^(torch|torchvision)==' .ci/torch-pair.txt | tr '\n' ' ')
image="transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 tokenizers==0.23.2 huggingface-hub==1.33.0
       typer rich pyyaml pillow numpy pyarrow"
rm -rf "$venv"
python3 -m venv "$venv"
if python3 -m uv --version >/dev/null 2>&1; then uv=(python3 -m uv);
elif command -v uv >/dev/null; then uv=(uv);
else uv=(); fi
# The machine's local wheel store first (its torch builds), then PyPI; pip reads the same from its config.
indexes=()
for d in /opt/pypi-more/simple /opt/pypi/simple; do [ -d "$d" ] && indexes+=(--extra-index-url "file://$d"); done
# shellcheck disable=SC2086
if [ ${#uv[@]} -gt 0 ]; then
  links=(); [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  "${uv[@]}" pip install -q --python "$venv/bin/python" "${indexes[@]}" \
    --index-strategy unsafe-best-match "${links[@]}" $torch_pair $image
else
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $torch_pair $image
fi
echo "rehearsal venv: $(( $(date +%s) - start )) s ($("$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
bash benchmarks/device/kit.sh
# The device command, as the device runs it: python3 is the venv's, nothing of this repo's own venv leaks in.
work=$home/work
log=$home/run.out
rm -rf "$work"
set +e
env -u PYTHONPATH -u VIRTUAL_ENV PATH="$venv/bin:$PATH" PYTHON="$venv/bin/python3" PRISM_DEVICE_MODE=cpu \
  PRISM_DEVICE_WORK="$work" PRISM_DEVICE_RESULTS="$work/results" PRISM_HOME="$home/prism-home" \
  OMP_NUM_THREADS=1 bash benchmarks/device/run.sh > "$log" 2>&1
rc=$?
set -e
if [ $rc -ne 0 ]; then
  grep -v '^ ' "$log" | tail -40 >&2
  echo "error: the device command failed in the rehearsal (exit $rc; full log $log)" >&2
fi
echo "rehearsal: $(( $(date +%s) - start )) s in all; results $work/results/gpu_check-cpu.json"
tail -n 1 "$log"
exit $rc
