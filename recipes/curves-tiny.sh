#!/usr/bin/env bash
# The miniature's held-out curves (issue 36): from a finished ablation (recipes/ablation-tiny.sh, its OUT), per seed,
# rerun the faithful chain's PRISM align (mix -> mix-prism) and the DAPO after it with held-out evaluation inside
# training: greedy on synth test problems 0..EVAL_N-1 (never trained on; the ablation's own test slice starts at
# 1,500 and is not touched) at step 0, every EVERY steps and at the end, keeping align's best by accuracy. The
# settings are the ablation's own. Writes benchmarks/results/held-out-curves.{json,md,png} (benchmarks/held_out_curves.py).
#
#   OUT=out/ablation-tiny bash recipes/curves-tiny.sh          # after bash recipes/ablation-tiny.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/out/ablation-tiny}
OUT=$(cd "$OUT" && pwd)
CURVES=${CURVES:-$OUT/curves}
RESULTS=${RESULTS:-$ROOT/benchmarks/results}
SEEDS=${SEEDS:-0 1 2}
EVERY=${EVERY:-2}
EVAL_N=${EVAL_N:-64}
JOBS=${JOBS:-2}
BASE=${BASE:-tiny-seeing}
cd "$ROOT"
source "$ROOT/recipes/tiny-env.sh"
export PRISM_NO_PROGRESS=${PRISM_NO_PROGRESS:-1}

HELD_OUT=(--eval-tasks synth --eval-every "$EVERY" --eval-n "$EVAL_N" --eval-max-new-tokens 128)
# the ablation's align and DAPO settings (recipes/ablation-tiny.sh: ALIGN_COMMON, RL_COMMON)
ALIGN=(--disc-base "$BASE" --warmup-steps 30 --warmup-prompts 256 --warmup-holdout 0.5 --warmup-batch 16
       --warmup-lr 1e-4 --steps 20 --prompts-per-step 4 --rollouts-per-prompt 8 --max-new-tokens 128 --lr 2e-5
       --disc-lr 2e-5 --freeze-vision --overwrite)
RL=(--algo dapo --data synth:train:1024 --prompts-per-step 8 --rollouts-per-prompt 8 --max-new-tokens 128 --lr 2e-5
    --warmup 2 --freeze-vision --overwrite --steps 20 --overlong-buffer 16)

curves_seed() {
  local S=$1 D=$OUT/seed$1 C=$CURVES/seed$1
  mkdir -p "$C"
  [ -f "$D/mix/prism.json" ] || { echo "error: $D/mix is not a finished run (run recipes/ablation-tiny.sh first)"; exit 1; }
  prism align --ckpt "$D/mix" --data "$D/curated" "${ALIGN[@]}" "${HELD_OUT[@]}" --keep best:synth/acc \
    --seed "$S" --out "$C/mix-prism"
  prism rl --ckpt "$C/mix-prism" "${RL[@]}" "${HELD_OUT[@]}" --seed "$S" --out "$C/mix-prism-dapo"
}

PIDS=()
for S in $SEEDS; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  echo "==> seed $S (log: $CURVES/seed$S.log)"
  mkdir -p "$CURVES"
  curves_seed "$S" > "$CURVES/seed$S.log" 2>&1 &
  PIDS+=($!)
done
status=0
for p in "${PIDS[@]}"; do wait "$p" || status=1; done
[ "$status" = 0 ] || { echo "error: a seed failed; see $CURVES/seed*.log"; exit 1; }
"$PY" "$ROOT/benchmarks/held_out_curves.py" --curves "$CURVES" --seeds $SEEDS --out "$RESULTS/held-out-curves"
