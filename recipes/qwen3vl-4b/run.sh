#!/usr/bin/env bash
# The paper's pipeline at Qwen3-VL-4B scale: curate -> sft -> align -> rl (dapo) -> eval -> export.
# Each stage reads its YAML here; the flags below only wire the stages' directories together.
#
#   PROBLEMS=data/problems PUBLIC_SFT=data/public-sft RL_DATA=data/rl-prompts bash recipes/qwen3vl-4b/run.sh
#   MULTINODE=1 NNODES=4 NODE_RANK=$RANK MASTER_ADDR=... bash recipes/qwen3vl-4b/run.sh   # on every node
#   DRY_RUN=1 bash recipes/qwen3vl-4b/run.sh     # print every stage's resolved plan, run nothing
#   SFT_TEACHER=1 bash recipes/qwen3vl-4b/run.sh # also the control the paper omits: plain SFT on the align
#                                                # data with align's policy steps and lr, then the same RL
#
# Needs: 8 x 80 GB GPUs per node (see README.md), GOOGLE_API_KEY for curation, the hub (or local
# copies) of Qwen/Qwen3-VL-4B-Instruct and Qwen/Qwen3-VL-2B-Instruct. Not run on GPUs by us.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/recipes/qwen3vl-4b
OUT=${OUT:-out/qwen3vl-4b}
PROBLEMS=${PROBLEMS:-data/problems}          # problem pool to curate from (ground-truth answers)
PUBLIC_SFT=${PUBLIC_SFT:-data/public-sft}    # public demonstrations (~1.26M in the paper, incl. MMR1)
ALIGN_DATA=${ALIGN_DATA:-$OUT/curated}       # prompts with teacher demos for alignment (paper: 5.9K)
RL_DATA=${RL_DATA:-data/rl-prompts}          # RL prompts with verifiable answers (paper: 2K)
BASE=${BASE:-Qwen/Qwen3-VL-4B-Instruct}
DISC_BASE=${DISC_BASE:-Qwen/Qwen3-VL-2B-Instruct}
TEACHER=${TEACHER:-gemini-3-flash}
ALGO=${ALGO:-dapo}                           # grpo | dapo | gspo (rl-$ALGO.yaml)
MULTINODE=${MULTINODE:-0}
SFT_TEACHER=${SFT_TEACHER:-0}
# The control's schedule: align.yaml's policy steps, lr and decay (500 x lr 1e-6 constant, wd 0.01); 16 demos a step
ALIGN_POLICY_STEPS=${ALIGN_POLICY_STEPS:-500}
ALIGN_POLICY_LR=${ALIGN_POLICY_LR:-1e-6}
DRY=()
[ "${DRY_RUN:-0}" = 1 ] && DRY=(--dry-run)

# Distributed stages go through accelerate: ZeRO-2 over the 8 local GPUs, or over NNODES x 8. ZeRO-2 is the
# backend tests/test_distributed.py proves for sft, align (two engines) and rl with two CPU ranks.
if [ "$MULTINODE" = 1 ]; then
  : "${NNODES:?MULTINODE=1 needs NNODES}" "${NODE_RANK:?MULTINODE=1 needs NODE_RANK}" "${MASTER_ADDR:?MULTINODE=1 needs MASTER_ADDR}"
  LAUNCH=(accelerate launch --config_file "$ROOT/recipes/accelerate/zero2-multinode.yaml"
          --num_machines "$NNODES" --num_processes $((8 * NNODES)) --machine_rank "$NODE_RANK"
          --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}" -m prism_cli)
else
  LAUNCH=(accelerate launch --config_file "$ROOT/recipes/accelerate/zero2.yaml" -m prism_cli)
fi
LOCAL=(python -m prism_cli)    # curate (API calls + vLLM student), eval (vLLM), export: one process
# Only the first node runs the single-process stages; every node joins the distributed ones.
main_node() { [ "$MULTINODE" != 1 ] || [ "$NODE_RANK" = 0 ]; }

# A dry run validates configs and prints plans: no GPUs, no launcher needed.
[ "${DRY_RUN:-0}" = 1 ] && LAUNCH=("${LOCAL[@]}")

t() { local name=$1 t0=$SECONDS; shift; echo "[$(date +%T)] $name: $*"; "$@"; echo "[$(date +%T)] $name done in $((SECONDS - t0))s"; }

if main_node; then
  t curate "${LOCAL[@]}" curate --config "$HERE/curate.yaml" --source "$PROBLEMS" --student "$BASE" \
    --teacher "$TEACHER" --out "$OUT/curated" "${DRY[@]}"
fi
t sft "${LAUNCH[@]}" sft --config "$HERE/sft.yaml" --ckpt "$BASE" \
  --data "$PUBLIC_SFT:0.918" --data "$OUT/curated:0.082" --out "$OUT/sft" "${DRY[@]}"
t align "${LAUNCH[@]}" align --config "$HERE/align.yaml" --ckpt "$OUT/sft" --data "$ALIGN_DATA" \
  --disc-base "$DISC_BASE" --out "$OUT/align" "${DRY[@]}"
t rl "${LAUNCH[@]}" rl --config "$HERE/rl-$ALGO.yaml" --ckpt "$OUT/align" --data "$RL_DATA" \
  --out "$OUT/rl-$ALGO" "${DRY[@]}"
CONTROL=()
if [ "$SFT_TEACHER" = 1 ]; then
  # What the game adds must beat this: the SFT policy trained on align's teacher demos directly, for as many
  # policy updates at the same lr as align, then the same RL (docs/miniature.md, the sft-teacher control).
  t sft-teacher "${LAUNCH[@]}" sft --config "$HERE/sft.yaml" --ckpt "$OUT/sft" --data "$ALIGN_DATA" \
    --max-steps "$ALIGN_POLICY_STEPS" --lr "$ALIGN_POLICY_LR" --schedule constant --warmup 0 --weight-decay 0.01 \
    --batch-size 16 --out "$OUT/sft-teacher" "${DRY[@]}"
  t rl-teacher "${LAUNCH[@]}" rl --config "$HERE/rl-$ALGO.yaml" --ckpt "$OUT/sft-teacher" --data "$RL_DATA" \
    --out "$OUT/sft-teacher-rl-$ALGO" "${DRY[@]}"
  CONTROL=(--ckpt "$OUT/sft-teacher" --ckpt "$OUT/sft-teacher-rl-$ALGO")
fi
if main_node; then
  # The paper's row set: base, SFT, PRISM (align), PRISM+RL (and the control with its RL)
  t eval "${LOCAL[@]}" eval --config "$HERE/eval.yaml" --ckpt "$BASE" --ckpt "$OUT/sft" --ckpt "$OUT/align" \
    --ckpt "$OUT/rl-$ALGO" "${CONTROL[@]}" --out "$OUT/eval" "${DRY[@]}"
  [ "${DRY_RUN:-0}" = 1 ] || t export "${LOCAL[@]}" export --ckpt "$OUT/rl-$ALGO" \
    --eval "$OUT/eval/eval-rl-$ALGO" --out "$OUT/hf" --dtype bf16
fi
