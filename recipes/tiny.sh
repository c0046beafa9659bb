#!/usr/bin/env bash
# The README demo: the whole PRISM pipeline on a CPU with the embedded tiny Qwen3-VL, one `prism`
# command per step, ending with the base / SFT / PRISM-align / RL comparison table.
#
#   bash recipes/tiny.sh                  # writes out/tiny/ (about 4-5 min on 2 cores)
#   OUT=/tmp/demo bash recipes/tiny.sh    # elsewhere; reruns overwrite (--overwrite)
#
# Step counts and learning rates are sized for the tiny model (1.3M parameters), not the paper's:
# SFT needs lr ~3e-3 and ~200 steps of 16 before greedy decoding is reliably format-valid (at 80 steps
# it still loops); align/RL use 5e-5/2e-5 (the paper's 1e-6 is for 4B models) and short responses
# (96 tokens), so DAPO's overlong buffer is 16, not 4096.
# The paper-scale chain is recipes/qwen3vl-4b/run.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/out/tiny}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

# ---- environment: an interpreter that imports prism, the `prism` function, offline single-thread env
source "$ROOT/recipes/tiny-env.sh"

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

# 1. curate: clean oracle demonstrations (through the verify gate) on one slice of synth, and a noisy
#    "public" set (oracle-noisy: wrong captions and reasoning slips, kept ungated) on another slice,
#    the way the paper mixes ~1.26M public demos with its curated Gemini ones.
step curate         curate --source synth:train:400 --teacher oracle --out "$OUT/curated" --overwrite
step curate-public  curate --source synth:train:800 --seed 1 --teacher oracle-noisy --gate none \
                      --out "$OUT/public" --overwrite

# 2. sft on the weighted mixture (30% curated, 70% public), from the embedded tiny base model
step sft            sft --ckpt tiny --data "$OUT/curated:0.3" --data "$OUT/public:0.7" \
                      --max-steps 200 --batch-size 16 --micro-batch-size 16 --lr 3e-3 --warmup 10 \
                      --eval-every 40 --save-every 1000 --out "$OUT/sft" --overwrite

# 3. align: PRISM pre-alignment against the curated teacher demos, MoE discriminator upcycled from tiny
step align          align --ckpt "$OUT/sft" --data "$OUT/curated" --disc-base tiny \
                      --warmup-steps 10 --warmup-prompts 64 --warmup-batch 16 \
                      --steps 12 --prompts-per-step 4 --rollouts-per-prompt 8 --max-new-tokens 96 \
                      --lr 5e-5 --disc-lr 5e-5 --out "$OUT/align" --overwrite

# 4. rl: DAPO with the verifiable reward on synth train problems
step rl             rl --algo dapo --ckpt "$OUT/align" --data synth:train:1024 \
                      --steps 10 --prompts-per-step 8 --rollouts-per-prompt 8 --max-new-tokens 96 \
                      --overlong-buffer 16 --lr 2e-5 --warmup 2 --out "$OUT/rl" --overwrite

# 5. eval: every stage's checkpoint on the held-out synth test split (greedy)
step eval           eval --ckpt tiny --ckpt "$OUT/sft" --ckpt "$OUT/align" --ckpt "$OUT/rl" \
                      --tasks synth --synth synth:test:200 --max-new-tokens 96 --batch-size 50 \
                      --out "$OUT/eval" --overwrite

# 6. export: the RL policy as a plain Hugging Face folder with a model card (reloaded and checked)
step export         export --ckpt "$OUT/rl" --eval "$OUT/eval/eval-rl" --out "$OUT/hf" --overwrite

echo
echo "==> timings ($(nproc --all) cores; load average at start $LOAD_START, now $(cut -d' ' -f1-3 /proc/loadavg))"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-14s %4ds\n' total $((SECONDS - START))
echo
prism eval --compare "$OUT/eval/eval-tiny,$OUT/eval/eval-sft,$OUT/eval/eval-align,$OUT/eval/eval-rl"
