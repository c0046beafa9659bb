#!/usr/bin/env bash
# The paper's comparison in miniature, on synth, on a CPU, from the seeing tiny base (`tiny-seeing`):
#   base -> SFT on drifted "public" demos -> {GRPO, DAPO, GSPO}
#   base -> SFT -> PRISM align -> {GRPO, DAPO, GSPO}
#   the discriminator ablations: SFT -> PRISM (dense disc) -> GRPO, SFT -> PRISM (text-only disc) -> GRPO
#   and a reference: SFT on the clean demos of the same problems (what the drift costs).
# Over several seeds, each row evaluated greedily on the same EVAL_N synth test problems. Writes
# benchmarks/results/ablation-tiny.{md,json,png}: mean and 95% interval per row, per-family accuracy,
# caption F1, exact object counts, green recall, the perception/reasoning error split, and the alignment
# game's own evidence (discriminator accuracy, score gaps, advantage spread).
#
#   bash recipes/ablation-tiny.sh                          # seeds 0 1 2, 500 test problems
#   SEEDS=0 EVAL_N=100 OUT=/tmp/abl bash recipes/ablation-tiny.sh
#
# REUSE="curate sft align" keeps those stages' finished outputs and reruns the rest. Seeds vary the SFT
# problems and order, align and RL sampling; the align data and the eval set are fixed. Tiny-model
# hyperparameters, not the paper's (docs/seeing-base.md says why each was chosen).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SEEDS=${SEEDS:-0 1 2}     # the committed table: 3 seeds, two at a time (JOBS=2), about 40 min on 2 cores
OUT=${OUT:-$ROOT/out/ablation-tiny}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RESULTS=${RESULTS:-$ROOT/benchmarks/results}
EVAL_N=${EVAL_N:-500}         # synth test problems per eval (greedy)
SFT_N=${SFT_N:-2000}          # problems in the SFT mix (drifted demonstrations)
SFT_STEPS=${SFT_STEPS:-400}
ALIGN_STEPS=${ALIGN_STEPS:-20}
WARMUP_STEPS=${WARMUP_STEPS:-30}      # the discriminator's Bradley-Terry warmup
WARMUP_PROMPTS=${WARMUP_PROMPTS:-128}
RL_STEPS=${RL_STEPS:-20}
REUSE=${REUSE:-}
BASE=${BASE:-tiny-seeing}      # the seeing base (a path works too)
# The rows every seed evaluates (the base is evaluated once: greedy decoding does not depend on the seed).
ROWS="sft_clean sft sft-grpo sft-dapo sft-gspo sft-prism sft-prism-grpo sft-prism-dapo sft-prism-gspo
      sft-prism_dense sft-prism_textonly sft-prism_dense-grpo sft-prism_textonly-grpo"
cd "$ROOT"

source "$ROOT/recipes/tiny-env.sh"
export PRISM_NO_PROGRESS=${PRISM_NO_PROGRESS:-1}

START=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
JOBS=${JOBS:-2}               # seeds run side by side, one single-threaded process each
TIMINGS_FILE=$OUT/timings.txt
: > "$TIMINGS_FILE"
step() {  # step NAME prism-args...: run one stage (unless REUSE keeps its finished output), time it
  local name=$1; shift
  local t0=$SECONDS out="" prev="" a kind=${1}
  for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
  if [ -n "$out" ] && [ -f "$out/prism.json" ] && [[ " $REUSE " == *" $kind "* ]]; then
    echo "==> [$name] reusing $out (REUSE=\"$REUSE\")"
    echo "$name reused" >> "$TIMINGS_FILE"
    return
  fi
  echo "==> [$name] prism $*"
  prism "$@"
  echo "$name $((SECONDS - t0))" >> "$TIMINGS_FILE"
}

# The alignment data: the (clean) teacher's demonstrations of problems the SFT mix does not hold.
step curate curate --source synth:train:400 --seed 101 --teacher oracle --out "$OUT/curated" --overwrite

SFT_COMMON=(--ckpt "$BASE" --max-steps "$SFT_STEPS" --batch-size 8 --micro-batch-size 8 --lr 1e-3 --warmup 20
            --eval-every 200 --save-every 10000 --freeze-vision --overwrite)
ALIGN_COMMON=(--data "$OUT/curated" --disc-base "$BASE" --warmup-steps "$WARMUP_STEPS"
              --warmup-prompts "$WARMUP_PROMPTS" --warmup-batch 16
              --warmup-lr 1e-4 --steps "$ALIGN_STEPS" --prompts-per-step 4 --rollouts-per-prompt 8
              --max-new-tokens 128 --lr 2e-5 --disc-lr 2e-5 --freeze-vision --overwrite)
RL_COMMON=(--data synth:train:1024 --steps "$RL_STEPS" --prompts-per-step 8 --rollouts-per-prompt 8
           --max-new-tokens 128 --lr 2e-5 --warmup 2 --freeze-vision --overwrite)
# DAPO's overlong buffer must sit well below max_new_tokens at this scale (paper: 4096 of 8192)
rl_extra() { [ "$1" = dapo ] && echo "--overlong-buffer 16" || true; }

evaluate() {  # evaluate NAME DIR CKPT...: greedy, on the same EVAL_N test problems (eval's seed stays 0)
  local name=$1 dir=$2; shift 2
  local t0=$SECONDS args=() c
  for c in "$@"; do args+=(--ckpt "$c"); done
  if [[ " $REUSE " == *" eval "* ]] && [ -d "$dir" ]; then
    echo "==> [$name] reusing $dir"; echo "$name reused" >> "$TIMINGS_FILE"; return
  fi
  echo "==> [$name] prism eval of $# checkpoints on synth:test:$EVAL_N"
  prism eval "${args[@]}" --synth "synth:test:$EVAL_N" --max-new-tokens 128 --batch-size 50 --seed 0 \
    --out "$dir" --overwrite
  echo "$name $((SECONDS - t0))" >> "$TIMINGS_FILE"
}

run_seed() {
  local S=$1 D=$OUT/seed$1 FROM A V C CKPTS=()
  mkdir -p "$D"
  step "sft/s$S" sft "${SFT_COMMON[@]}" --data "synth:train:$SFT_N:drift" --seed "$S" --out "$D/sft"
  step "sft_clean/s$S" sft "${SFT_COMMON[@]}" --data "synth:train:$SFT_N" --seed "$S" --out "$D/sft_clean"
  step "align/s$S" align --ckpt "$D/sft" "${ALIGN_COMMON[@]}" --seed "$S" --out "$D/sft-prism"
  step "align-dense/s$S" align --ckpt "$D/sft" "${ALIGN_COMMON[@]}" --disc-dense --seed "$S" \
    --out "$D/sft-prism_dense"
  step "align-textonly/s$S" align --ckpt "$D/sft" "${ALIGN_COMMON[@]}" --disc-text-only --seed "$S" \
    --out "$D/sft-prism_textonly"
  for FROM in sft sft-prism; do
    for A in grpo dapo gspo; do
      # shellcheck disable=SC2046
      step "$FROM-$A/s$S" rl --algo "$A" --ckpt "$D/$FROM" "${RL_COMMON[@]}" $(rl_extra "$A") --seed "$S" \
        --out "$D/$FROM-$A"
    done
  done
  for V in dense textonly; do
    step "prism_$V-grpo/s$S" rl --algo grpo --ckpt "$D/sft-prism_$V" "${RL_COMMON[@]}" --seed "$S" \
      --out "$D/sft-prism_$V-grpo"
  done
  for C in $ROWS; do CKPTS+=("$D/$C"); done
  evaluate "eval/s$S" "$D/evals" "${CKPTS[@]}"
}

# The base's evaluation and each seed's chain are independent jobs, JOBS at a time; each logs to its file.
PIDS=()
launch() {  # launch LOG COMMAND...: run in the background once fewer than JOBS are running
  local log=$1; shift
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  echo "==> $* (log: $log)"
  ( "$@" ) > "$log" 2>&1 &
  PIDS+=("$!")
}
launch "$OUT/eval-base.log" evaluate eval-base "$OUT/evals-base" "$BASE"
for S in $SEEDS; do launch "$OUT/seed$S.log" run_seed "$S"; done
FAILED=0
for P in "${PIDS[@]}"; do wait "$P" || FAILED=1; done
if [ "$FAILED" = 1 ]; then
  echo "ablation: a job failed; its log under $OUT says why (finished stages are kept: rerun with REUSE)" >&2
  tail -n 5 "$OUT"/*.log >&2
  exit 1
fi

# The table (mean, 95% interval over seeds), per-family accuracy, perception measures, the game's evidence.
WALL=$((SECONDS - START))
mkdir -p "$RESULTS"
"$PY" "$ROOT/benchmarks/ablation_table.py" --out-dir "$OUT" --seeds "$SEEDS" --eval-n "$EVAL_N" \
  --results "$RESULTS/ablation-tiny" --wall "$WALL" --load-start "$LOAD_START" \
  --settings "sft $SFT_STEPS steps x 8 on synth:train:$SFT_N(:drift), lr 1e-3, tower frozen; align warmup $WARMUP_STEPS x 16 pairs ($WARMUP_PROMPTS prompts), $ALIGN_STEPS steps x 4 prompts x 8 rollouts, lr 2e-5 (policy and discriminator); rl $RL_STEPS steps x 8 prompts x 8 rollouts, lr 2e-5; max 128 new tokens" \
  --timings "$(paste -sd, "$TIMINGS_FILE" | sed 's/,/, /g')"
