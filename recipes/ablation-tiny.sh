#!/usr/bin/env bash
# The paper's comparison in miniature, designed to show what PRISM adds over its simplest alternative
# (docs/miniature.md holds the design, fixed before its runs). On synth, on a CPU, from the seeing tiny base
# (`tiny-seeing`), per seed S:
#   the teacher's demos: 400 synth train problems curated with the clean oracle (seed 101+S)
#   sft:  SFT on 2,000 drifted "public" demos (seed S: the problems and the drift's realisation)
#   mix:  SFT on the faithful mix, the drifted demos plus the teacher's demos (as in the paper)
#   from each: PRISM align on the teacher's demos (-prism) and, as its control, plain SFT on the same demos
#   with align's policy steps and lr (-teacher); then DAPO from mix and mix-prism (and sft-prism), and DAPO
#   with as many policy steps as PRISM + DAPO (-dapo-2x). ALGOS="dapo grpo gspo" adds GRPO and GSPO.
# Every row is evaluated greedily on the same untouched test slice, synth test problems TEST_FIRST ..
# TEST_FIRST+EVAL_N-1 (never used for any choice). Writes benchmarks/results/ablation-tiny.{md,json,png}:
# per-row means, paired bootstrap intervals over seeds x problems for the comparisons fixed in the design,
# per-problem win/loss counts, perception measures and the alignment game's evidence.
#
#   bash recipes/ablation-tiny.sh                                   # seeds 0 1 2, 2,000 test problems
#   SEEDS=0 EVAL_N=300 OUT=/tmp/abl RESULTS=/tmp/abl-results bash recipes/ablation-tiny.sh   # a smoke run
#
# Each seed runs as two chains (the sft chain and the mix chain), JOBS at a time. REUSE="curate sft align rl"
# keeps those stages' finished outputs and reruns the rest. Tiny-model hyperparameters, not the paper's
# (docs/seeing-base.md says why each was chosen).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-$ROOT/out/ablation-tiny}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RESULTS=${RESULTS:-$ROOT/benchmarks/results}
EVAL_N=${EVAL_N:-2000}        # synth test problems per eval (greedy) ...
TEST_FIRST=${TEST_FIRST:-1500} # ... from this index on: the untouched slice (docs/miniature.md)
SFT_N=${SFT_N:-2000}          # drifted public demonstrations in the SFT mix
TEACHER_N=${TEACHER_N:-400}   # problems curated by the clean teacher (in the mix; align's prompts)
SFT_STEPS=${SFT_STEPS:-400}
ALIGN_STEPS=${ALIGN_STEPS:-20}
WARMUP_STEPS=${WARMUP_STEPS:-30}      # the discriminator's Bradley-Terry warmup
WARMUP_PROMPTS=${WARMUP_PROMPTS:-256} # half held out: 128 pairs to measure each expert on
WARMUP_HOLDOUT=${WARMUP_HOLDOUT:-0.5}
RL_STEPS=${RL_STEPS:-20}
ALGOS=${ALGOS:-dapo}          # RL after mix and mix-prism; dapo is always run (the -2x controls use it)
REUSE=${REUSE:-}
BASE=${BASE:-tiny-seeing}      # the seeing base (a path works too)
SYNTH_TEST=synth:test:$EVAL_N:from$TEST_FIRST
[[ " $ALGOS " == *" dapo "* ]] || ALGOS="dapo $ALGOS"
# The rows each chain evaluates (the base is evaluated once: greedy decoding does not depend on the seed).
SFT_ROWS="sft sft-prism sft-teacher sft-prism-dapo sft-dapo-2x"
MIX_ROWS="mix mix-prism mix-teacher mix-dapo-2x"
for A in $ALGOS; do MIX_ROWS="$MIX_ROWS mix-$A mix-prism-$A"; done
cd "$ROOT"

source "$ROOT/recipes/tiny-env.sh"
export PRISM_NO_PROGRESS=${PRISM_NO_PROGRESS:-1}

START=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
JOBS=${JOBS:-2}               # chains run side by side, one single-threaded process each
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

SFT_COMMON=(--batch-size 8 --micro-batch-size 8 --freeze-vision --overwrite)
SFT_MAIN=(--ckpt "$BASE" --max-steps "$SFT_STEPS" --lr 1e-3 --warmup 20 --eval-every 200 --save-every 10000)
# The control the paper omits: plain SFT on the teacher's demos with align's policy steps and lr
TEACHER_CONTROL=(--max-steps "$ALIGN_STEPS" --lr 2e-5 --warmup 2 --save-every 10000)
ALIGN_COMMON=(--disc-base "$BASE" --warmup-steps "$WARMUP_STEPS" --warmup-prompts "$WARMUP_PROMPTS"
              --warmup-holdout "$WARMUP_HOLDOUT" --warmup-batch 16
              --warmup-lr 1e-4 --steps "$ALIGN_STEPS" --prompts-per-step 4 --rollouts-per-prompt 8
              --max-new-tokens 128 --lr 2e-5 --disc-lr 2e-5 --freeze-vision --overwrite)
RL_COMMON=(--data synth:train:1024 --prompts-per-step 8 --rollouts-per-prompt 8
           --max-new-tokens 128 --lr 2e-5 --warmup 2 --freeze-vision --overwrite)
# DAPO's overlong buffer must sit well below max_new_tokens at this scale (paper: 4096 of 8192)
rl_extra() { [ "$1" = dapo ] && echo "--overlong-buffer 16" || true; }

evaluate() {  # evaluate NAME DIR CKPT...: greedy, on the same test slice (eval's seed stays 0)
  local name=$1 dir=$2; shift 2
  local t0=$SECONDS args=() c
  for c in "$@"; do args+=(--ckpt "$c"); done
  if [[ " $REUSE " == *" eval "* ]] && [ -d "$dir" ]; then
    echo "==> [$name] reusing $dir"; echo "$name reused" >> "$TIMINGS_FILE"; return
  fi
  echo "==> [$name] prism eval of $# checkpoints on $SYNTH_TEST"
  prism eval "${args[@]}" --synth "$SYNTH_TEST" --max-new-tokens 128 --batch-size 50 --seed 0 \
    --out "$dir" --overwrite
  echo "$name $((SECONDS - t0))" >> "$TIMINGS_FILE"
}

curate_seed() {  # the teacher's demonstrations: problems no public set holds (seed 101+S), per seed
  local S=$1
  mkdir -p "$OUT/seed$S"
  step "curate/s$S" curate --source "synth:train:$TEACHER_N" --seed $((101 + S)) --teacher oracle \
    --out "$OUT/seed$S/curated" --overwrite
}

rl_row() {  # rl_row NAME S ALGO FROM STEPS
  local name=$1 S=$2 A=$3 FROM=$4 N=$5 D=$OUT/seed$2
  # shellcheck disable=SC2046
  step "$name/s$S" rl --algo "$A" --ckpt "$D/$FROM" "${RL_COMMON[@]}" --steps "$N" $(rl_extra "$A") \
    --seed "$S" --out "$D/$name"
}

chain() {  # chain sft|mix S: the chain's SFT, its align and teacher control, its RL rows, its evaluation
  local C=$1 S=$2 D=$OUT/seed$2 A R CKPTS=() DATA=(--data "synth:train:$SFT_N:drift")
  [ "$C" = mix ] && DATA+=(--data "$D/curated")
  step "$C/s$S" sft "${SFT_COMMON[@]}" "${SFT_MAIN[@]}" "${DATA[@]}" --seed "$S" --out "$D/$C"
  step "$C-prism/s$S" align --ckpt "$D/$C" --data "$D/curated" "${ALIGN_COMMON[@]}" --seed "$S" \
    --out "$D/$C-prism"
  step "$C-teacher/s$S" sft --ckpt "$D/$C" --data "$D/curated" "${SFT_COMMON[@]}" "${TEACHER_CONTROL[@]}" \
    --seed "$S" --out "$D/$C-teacher"
  if [ "$C" = mix ]; then
    for A in $ALGOS; do
      rl_row "mix-$A" "$S" "$A" mix "$RL_STEPS"
      rl_row "mix-prism-$A" "$S" "$A" mix-prism "$RL_STEPS"
    done
    R=$MIX_ROWS
  else
    rl_row sft-prism-dapo "$S" dapo sft-prism "$RL_STEPS"
    R=$SFT_ROWS
  fi
  rl_row "$C-dapo-2x" "$S" dapo "$C" $((ALIGN_STEPS + RL_STEPS))  # as many policy steps as PRISM + DAPO
  for A in $R; do CKPTS+=("$D/$A"); done
  evaluate "eval-$C/s$S" "$D/evals-$C" "${CKPTS[@]}"
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
for S in $SEEDS; do curate_seed "$S"; done     # seconds each; both chains of a seed read it
launch "$OUT/eval-base.log" evaluate eval-base "$OUT/evals-base" "$BASE"
for S in $SEEDS; do
  launch "$OUT/seed$S-mix.log" chain mix "$S"
  launch "$OUT/seed$S-sft.log" chain sft "$S"
done
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
  --test-first "$TEST_FIRST" --results "$RESULTS/ablation-tiny" --wall "$WALL" --load-start "$LOAD_START" \
  --settings "sft $SFT_STEPS steps x 8 on synth:train:$SFT_N:drift (sft) or that plus $TEACHER_N curated teacher demos (mix), lr 1e-3, tower frozen; teacher control: $ALIGN_STEPS steps x 8 teacher demos, lr 2e-5; align warmup $WARMUP_STEPS x 16 pairs ($WARMUP_PROMPTS prompts, $WARMUP_HOLDOUT held out), $ALIGN_STEPS steps x 4 prompts x 8 rollouts, lr 2e-5 (policy and discriminator); rl $RL_STEPS steps (-2x: $((ALIGN_STEPS + RL_STEPS))) x 8 prompts x 8 rollouts, lr 2e-5; max 128 new tokens; test $SYNTH_TEST" \
  --timings "$(paste -sd, "$TIMINGS_FILE" | sed 's/,/, /g')"
