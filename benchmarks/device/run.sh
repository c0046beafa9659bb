#!/usr/bin/env bash
# The one command for a GPU window (docs/gpu-check.md): installs the wheel kit (.whl/, from kit.sh) into a
# target folder, then runs the device check's steps in order, each in its own process under its own time
# limit, merging what every step finished into RESULTS/gpu_check-<machine>.json after each one, so a step cut
# short (or the whole call) still leaves the figures before it. The last line is the summary.
#
#   bash benchmarks/device/run.sh                  # every step: env stages cli rollout disc_memory attention
#   bash benchmarks/device/run.sh cli rollout      # only these (a rerun; PRISM_DEVICE_MERGE=earlier.json keeps
#                                                  # the earlier run's other steps in the results file)
# Environment: OUT or PRISM_DEVICE_RESULTS (results folder; default $PRISM_DEVICE_WORK/results),
# PRISM_DEVICE_WORK (scratch, default /tmp/prism-device), PRISM_DEVICE_MODE (gpu | cpu; default gpu where
# CUDA exists), PYTHON (default python3: the lent image has no `python`).
# GPU mode is sized to end within 8 minutes on one H100: the step limits below add up to 470 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
py=${PYTHON:-python3}
work=${PRISM_DEVICE_WORK:-/tmp/prism-device}
results=${PRISM_DEVICE_RESULTS:-${OUT:-$work/results}}
mkdir -p "$work" "$results"
exec > >(tee -a "$results/run.log") 2>&1
start=$(date +%s)

# The kit: every wheel kit.txt names must be there (kit.sh gathers them), installed without an index.
site=$work/site
wanted=$(grep -cv -e '^\s*#' -e '^\s*$' benchmarks/device/kit.txt || true)
shopt -s nullglob
wheels=(.whl/*.whl)
if [ "${#wheels[@]}" -lt "$wanted" ]; then
  echo "error: .whl/ holds ${#wheels[@]} wheels, kit.txt names $wanted: run bash benchmarks/device/kit.sh here" \
       "and carry .whl with the call" >&2
  exit 2
fi
if [ "${#wheels[@]}" -gt 0 ]; then
  rm -rf "$site"
  "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "${wheels[@]}" || { echo "error: the kit did not install" >&2; exit 2; }
fi
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
export PRISM_HOME=${PRISM_HOME:-$work/home} PRISM_DEVICE_WORK=$work
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
echo "kit: ${#wheels[@]} wheels installed ($(( $(date +%s) - start )) s)"

mode=${PRISM_DEVICE_MODE:-$("$py" -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")')}
export PRISM_DEVICE_MODE=$mode
if [ "$mode" = gpu ]; then
  declare -A limit=([env]=20 [stages]=120 [cli]=190 [rollout]=70 [disc_memory]=45 [attention]=25)
else   # the rehearsal: generous limits, they only stop a hang
  declare -A limit=([env]=300 [stages]=600 [cli]=900 [rollout]=300 [disc_memory]=300 [attention]=300)
fi
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then steps=(env stages cli rollout disc_memory attention); fi
parts=$work/parts
rm -rf "$parts"
mkdir -p "$parts"
failed=0
for step in "${steps[@]}"; do
  if [ -z "${limit[$step]:-}" ]; then echo "error: unknown step $step" >&2; exit 2; fi
  echo "== $step (limit ${limit[$step]} s, mode $mode, $(( $(date +%s) - start )) s in)"
  timeout -k 10 "${limit[$step]}" "$py" benchmarks/device/check.py "$step" --parts "$parts"
  rc=$?
  [ $rc -eq 0 ] || failed=1
  "$py" benchmarks/device/check.py collect --parts "$parts" --results "$results" --step "$step" --rc $rc >/dev/null
done
echo "device check: $(( $(date +%s) - start )) s in all; results in $results"
"$py" benchmarks/device/check.py collect --parts "$parts" --results "$results"
exit $failed
