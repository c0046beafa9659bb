#!/usr/bin/env bash
# The README demo: the whole PRISM pipeline on a CPU, one `prism` command per step, from the seeing tiny
# Qwen3-VL (`tiny-seeing`, perception-pretrained; shipped with the package), ending with the base / SFT /
# PRISM-align / RL comparison table.
#
#   bash recipes/tiny.sh                  # writes out/tiny/ (12-13 min on 2 cores shared with other jobs)
#   OUT=/tmp/demo bash recipes/tiny.sh    # elsewhere; a rerun replaces the runs it wrote (--overwrite
#                                         # only ever replaces a prism run of the same stage, never your files)
#   SFT_TEACHER=1 bash recipes/tiny.sh    # adds the control: plain SFT on align's teacher demos, align's steps and lr
#
# What it shows: SFT on drifted "public" demonstrations (synth:train:N:drift: a consistent green->blue
# confusion, a dropped object, an off-by-one step) costs the base perception it had (caption F1, exact
# object counts); align and RL then run on that drifted policy. Every checkpoint is evaluated on synth test
# problems 1,500-1,699, a slice never used to choose anything (docs/miniature.md), and the last table pairs
# each with the base problem by problem. recipes/ablation-tiny.sh measures the whole comparison over seeds,
# with the controls (benchmarks/results/ablation-tiny.md).
# Step counts and learning rates are sized for the tiny model (1.3M parameters), not the paper's: align/RL
# use 2e-5 (the paper's 1e-6 is for 4B models) and short responses (128 tokens), so DAPO's overlong buffer
# is 16, not 4096. The paper-scale chain is recipes/qwen3vl-4b/run.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/out/tiny}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

# ---- environment: an interpreter that imports prism, the `prism` function, offline single-thread env
source "$ROOT/recipes/tiny-env.sh"

SFT_TEACHER=${SFT_TEACHER:-0}   # 1: also run the control the paper omits (step 3b)
START=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TIMINGS=()
step() {  # step NAME prism-args...: run one stage and remember its wall time
  local name=$1; shift
  local t0=$SECONDS
  echo
  echo "==> [$name] prism $*"
  prism "$@"
  TIMINGS+=("$(printf '%-14s %4ds' "$name" $((SECONDS - t0)))")
}

# 1. curate: the teacher's (clean oracle) demonstrations of 400 synth problems, through the verify gate:
#    the alignment stage's data, like the paper's curated Gemini set.
step curate         curate --source synth:train:400 --seed 101 --teacher oracle --out "$OUT/curated" --overwrite

# 2. sft from the seeing base on 2,000 problems with drifted demonstrations (the paper's public SFT mix:
#    errors that repeat the same way), the vision tower frozen
step sft            sft --ckpt tiny-seeing --data synth:train:2000:drift --max-steps 400 --batch-size 8 \
                      --micro-batch-size 8 --lr 1e-3 --warmup 20 --eval-every 200 --save-every 1000 \
                      --freeze-vision --out "$OUT/sft" --overwrite

# 3. align: PRISM pre-alignment against the curated teacher demos, MoE discriminator upcycled from the base
step align          align --ckpt "$OUT/sft" --data "$OUT/curated" --disc-base tiny-seeing \
                      --warmup-steps 30 --warmup-prompts 128 --warmup-batch 16 --warmup-lr 1e-4 \
                      --steps 20 --prompts-per-step 4 --rollouts-per-prompt 8 --max-new-tokens 128 \
                      --lr 2e-5 --disc-lr 2e-5 --freeze-vision --out "$OUT/align" --overwrite

# 3b. (SFT_TEACHER=1) the control: plain SFT from the same drifted policy on the same teacher demos, with
#     align's policy steps and lr. What the game adds is what align does beyond this.
CONTROL=()
if [ "$SFT_TEACHER" = 1 ]; then
  step sft-teacher  sft --ckpt "$OUT/sft" --data "$OUT/curated" --max-steps 20 --batch-size 8 --micro-batch-size 8 \
                      --lr 2e-5 --warmup 2 --save-every 1000 --freeze-vision --out "$OUT/sft-teacher" --overwrite
  CONTROL=(--ckpt "$OUT/sft-teacher")
fi

# 4. rl: DAPO with the verifiable reward on synth train problems
step rl             rl --algo dapo --ckpt "$OUT/align" --data synth:train:1024 \
                      --steps 20 --prompts-per-step 8 --rollouts-per-prompt 8 --max-new-tokens 128 \
                      --overlong-buffer 16 --lr 2e-5 --warmup 2 --freeze-vision --out "$OUT/rl" --overwrite

# 5. eval: every stage's checkpoint on 200 held-out synth test problems from 1,500 on (greedy)
step eval           eval --ckpt tiny-seeing --ckpt "$OUT/sft" "${CONTROL[@]}" --ckpt "$OUT/align" --ckpt "$OUT/rl" \
                      --tasks synth --synth synth:test:200:from1500 --max-new-tokens 128 --batch-size 50 \
                      --out "$OUT/eval" --overwrite

# 6. export: the RL policy as a plain Hugging Face folder with a model card (reloaded and checked)
step export         export --ckpt "$OUT/rl" --eval "$OUT/eval/eval-rl" --out "$OUT/hf" --overwrite

echo
echo "==> timings ($(nproc --all) cores; load average at start $LOAD_START, now $(cut -d' ' -f1-3 /proc/loadavg))"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-14s %4ds\n' total $((SECONDS - START))
echo "  (the comparison table, each checkpoint paired with the base problem by problem, is the eval step's, above;"
echo "   again: prism eval --compare $OUT/eval/eval-tiny-seeing,...)"
if [ "$PY" = "$ROOT/.venv/bin/python" ]; then
  echo "  (prism is installed in $ROOT/.venv: \`source $ROOT/.venv/bin/activate\` puts \`prism\` on your PATH)"
fi
