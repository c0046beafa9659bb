#!/usr/bin/env bash
# The paper's comparison in miniature, on synth with the embedded tiny Qwen3-VL, on a CPU:
#   base, SFT, SFT->{GRPO,DAPO,GSPO}, SFT->PRISM, SFT->PRISM->{GRPO,DAPO,GSPO},
#   and the discriminator ablations SFT->PRISM(dense disc)->GRPO, SFT->PRISM(text-only disc)->GRPO.
# Writes benchmarks/results/ablation-tiny.md (the table, the machine, the wall time) and ablation-tiny.png.
#
#   bash recipes/ablation-tiny.sh                 # one seed (0)
#   SEEDS="0 1 2" OUT=/tmp/abl bash recipes/ablation-tiny.sh
#
# REUSE="curate sft align" keeps those finished outputs and reruns the rest (e.g. RL_LR=1e-4 REUSE=...).
# Seeds vary training (sft, align, rl sampling and data order); the curated data and the eval set are
# fixed. Tiny-model hyperparameters, not the paper's (see recipes/tiny.sh for why). ~30-40 min per
# seed on 2 loaded CPU cores.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SEEDS=${SEEDS:-0}
OUT=${OUT:-$ROOT/out/ablation-tiny}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RESULTS=${RESULTS:-$ROOT/benchmarks/results}
MD=$RESULTS/ablation-tiny.md
PNG=$RESULTS/ablation-tiny.png
EVAL_N=${EVAL_N:-100}        # synth test problems per eval (greedy)
SFT_STEPS=${SFT_STEPS:-80}
ALIGN_STEPS=${ALIGN_STEPS:-10}
RL_STEPS=${RL_STEPS:-8}
RL_LR=${RL_LR:-2e-5}         # 1e-4 raised format but cost greedy accuracy on the tiny model; 2e-5 did not
REUSE=${REUSE:-}             # e.g. REUSE="curate sft align": keep those stages' finished outputs (to rerun RL only)
cd "$ROOT"

# ---- environment: an interpreter that imports prism, the `prism` function, offline single-thread env
source "$ROOT/recipes/tiny-env.sh"
export PRISM_NO_PROGRESS=${PRISM_NO_PROGRESS:-1}

START=$SECONDS
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TIMINGS=()
step() {  # step NAME prism-args...: run one stage, remember its wall time
  local name=$1; shift
  local t0=$SECONDS out="" prev="" a kind=${1}
  for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
  if [ -n "$out" ] && [ -f "$out/prism.json" ] && [[ " $REUSE " == *" $kind "* ]]; then
    echo "==> [$name] reusing $out (REUSE=\"$REUSE\")"
    TIMINGS+=("$name reused")
    return
  fi
  echo "==> [$name] prism $*"
  prism "$@"
  TIMINGS+=("$name $((SECONDS - t0))")
}

# ---- data (shared by every seed): clean oracle demos + a noisy "public" mixture
step curate curate --source synth:train:400 --teacher oracle --out "$OUT/curated" --overwrite
step curate-public curate --source synth:train:800 --seed 1 --teacher oracle-noisy --gate none \
  --out "$OUT/public" --overwrite

ALIGN_COMMON=(--data "$OUT/curated" --disc-base tiny --warmup-steps 10 --warmup-prompts 64 --warmup-batch 16
              --steps "$ALIGN_STEPS" --prompts-per-step 4 --rollouts-per-prompt 8 --max-new-tokens 96
              --lr 5e-5 --disc-lr 5e-5 --overwrite)
RL_COMMON=(--data synth:train:1024 --steps "$RL_STEPS" --prompts-per-step 8 --rollouts-per-prompt 8
           --max-new-tokens 96 --lr "$RL_LR" --warmup 2 --overwrite)
# DAPO's overlong buffer must sit well below max_new_tokens at this scale (paper: 4096 of 8192)
rl_extra() { [ "$1" = dapo ] && echo "--overlong-buffer 16" || true; }

EVAL_DIRS=()
for S in $SEEDS; do
  D=$OUT/seed$S
  mkdir -p "$D"
  step "sft/s$S" sft --ckpt tiny --data "$OUT/curated:0.3" --data "$OUT/public:0.7" --max-steps "$SFT_STEPS" \
    --batch-size 16 --micro-batch-size 16 --lr 2e-3 --warmup 8 --eval-every 40 --save-every 1000 \
    --seed "$S" --out "$D/sft" --overwrite
  step "align/s$S" align --ckpt "$D/sft" "${ALIGN_COMMON[@]}" --seed "$S" --out "$D/sft-prism"
  step "align-dense/s$S" align --ckpt "$D/sft" "${ALIGN_COMMON[@]}" --disc-dense --seed "$S" \
    --out "$D/sft-prism_dense"
  step "align-textonly/s$S" align --ckpt "$D/sft" "${ALIGN_COMMON[@]}" --disc-text-only --seed "$S" \
    --out "$D/sft-prism_textonly"
  CKPTS=(tiny sft)
  for A in grpo dapo gspo; do
    # shellcheck disable=SC2046
    step "rl-$A/s$S" rl --algo "$A" --ckpt "$D/sft" "${RL_COMMON[@]}" $(rl_extra "$A") --seed "$S" \
      --out "$D/sft-$A"
    CKPTS+=("sft-$A")
  done
  CKPTS+=(sft-prism)
  for A in grpo dapo gspo; do
    # shellcheck disable=SC2046
    step "prism-rl-$A/s$S" rl --algo "$A" --ckpt "$D/sft-prism" "${RL_COMMON[@]}" $(rl_extra "$A") \
      --seed "$S" --out "$D/sft-prism-$A"
    CKPTS+=("sft-prism-$A")
  done
  for V in dense textonly; do
    step "prism_$V-rl-grpo/s$S" rl --algo grpo --ckpt "$D/sft-prism_$V" "${RL_COMMON[@]}" --seed "$S" \
      --out "$D/sft-prism_$V-grpo"
    CKPTS+=("sft-prism_$V-grpo")
  done
  # One eval command for all rows (one process, the same test set: eval's seed stays 0).
  # Refs relative to $OUT so the table's row labels read seedS/NAME.
  ARGS=()
  for C in "${CKPTS[@]}"; do [ "$C" = tiny ] && ARGS+=(--ckpt tiny) || ARGS+=(--ckpt "seed$S/$C"); done
  t0=$SECONDS
  echo "==> [eval/s$S] prism eval ${ARGS[*]}"
  (cd "$OUT" && prism eval "${ARGS[@]}" --synth "synth:test:$EVAL_N" --max-new-tokens 96 --batch-size 50 \
     --seed 0 --out "seed$S/evals" --overwrite)
  TIMINGS+=("eval/s$S $((SECONDS - t0))")
  for C in "${CKPTS[@]}"; do EVAL_DIRS+=("seed$S/evals/eval-$C"); done
done

# ---- the table, the machine, the wall time, the plot
mkdir -p "$RESULTS"
WALL=$((SECONDS - START))
(cd "$OUT" && IFS=, && prism eval --compare "${EVAL_DIRS[*]}" --markdown "$MD")
{
  echo
  echo "Rows: base = the embedded tiny Qwen3-VL; SFT on a 30/70 mix of clean oracle demos and noisy"
  echo "(oracle-noisy, ungated) demos; PRISM = \`prism align\` (MoE discriminator upcycled from tiny);"
  echo "_dense / _textonly = the discriminator ablations; grpo/dapo/gspo = \`prism rl --algo\`."
  echo "Accuracy (%) on synth:test:$EVAL_N, greedy, max 96 new tokens; seeds: $SEEDS."
  echo
  echo "Settings: sft $SFT_STEPS steps x 16, lr 2e-3; align warmup 10 x 16 pairs, $ALIGN_STEPS steps x 4 prompts x 8"
  echo "rollouts, lr 5e-5 (policy and discriminator); rl $RL_STEPS steps x 8 prompts x 8 rollouts, lr $RL_LR, max 96"
  echo "new tokens (DAPO overlong buffer 16). Tiny-model settings, not the paper's."
  echo
  echo "Format-valid rate (%) of the same responses:"
  echo
  (cd "$OUT" && "$PY" - "${EVAL_DIRS[@]}" <<'PY'
import json, sys
print("| checkpoint | format | caption F1 |\n|---|---|---|")
for d in sys.argv[1:]:
    r = json.load(open(f"{d}/results.json"))
    x = r["tasks"]["synth"].get("extra", {})
    print(f"| {'tiny' if d.endswith('eval-tiny') else d.replace('/evals/eval-', '/')} | {100 * x.get('format', 0):.1f} | "
          f"{100 * x.get('caption_f1', 0):.1f} |")
PY
  )
  echo
  echo "Machine: \`$(uname -srmo)\`, $(nproc --all) cores; load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "(shared with other jobs). Wall time: ${WALL}s ($((WALL / 60)) min $((WALL % 60)) s) for seeds \"$SEEDS\"."
  echo
  echo "Stage wall times (s): $(printf '%s, ' "${TIMINGS[@]}" | sed 's/, $//')"
} >> "$MD"

(cd "$OUT" && "$PY" - "$PNG" "${EVAL_DIRS[@]}" <<'PY'
import json, sys
from collections import defaultdict
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

png, dirs = sys.argv[1], sys.argv[2:]
by_row = defaultdict(list)
for d in dirs:
    row = d.split("/evals/eval-")[1]
    by_row[row].append(100 * json.load(open(f"{d}/results.json"))["average"])
rows = list(by_row)
means = [sum(v) / len(v) for v in by_row.values()]
spread = [(max(v) - min(v)) / 2 for v in by_row.values()]
def label(r):
    if r == "tiny":
        return "base"
    for a, b in (("-", "→"), ("prism_dense", "PRISM(dense)"), ("prism_textonly", "PRISM(text-only)"),
                 ("prism", "PRISM"), ("sft", "SFT"), ("grpo", "GRPO"), ("dapo", "DAPO"), ("gspo", "GSPO")):
        r = r.replace(a, b)
    return r
labels = [label(r) for r in rows]
colors = ["#999999" if r == "tiny" else "#4c72b0" if r == "sft" else
          "#dd8452" if r.startswith("sft-prism") else "#55a868" for r in rows]
fig, ax = plt.subplots(figsize=(10, 5.5))
ax.bar(range(len(rows)), means, yerr=spread if any(spread) else None, color=colors, capsize=3)
for i, m in enumerate(means):
    ax.text(i, m + 0.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
ax.set_ylabel("synth accuracy (%)")
ax.set_ylim(0, max(max(means) * 1.15, 1))
ax.set_title(f"PRISM ablation in miniature (tiny Qwen3-VL, CPU), seeds: {len(next(iter(by_row.values())))}")
fig.subplots_adjust(bottom=0.32, top=0.92, left=0.07, right=0.98)
fig.savefig(png, dpi=120)
print(f"wrote {png}")
PY
)

echo
echo "stage timings (s):"
printf '  %s\n' "${TIMINGS[@]}"
echo "total wall time: ${WALL}s; table: $MD; plot: $PNG"
