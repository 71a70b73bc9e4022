#!/usr/bin/env bash
# Small-scale replication of Switch-DiT's claim (at equal steps Switch-DiT beats DiT): trains DiT
# and Switch-DiT of the same size, steps, batch and seed on the handwritten digits, scores the EMA
# weights at three points of training (Fréchet distance and class accuracy under the digits
# classifier), prints a table and writes a plot. About 21 minutes on a 2-core CPU (docs/results.md).
#
#   tools/replicate_small.sh [--out DIR] [--data DIR] [--steps N] [--seed S] [--per-class N]
#                            [--sampling-steps N] [--nproc N] [--experts E] [--ep-size P]
#                            [--zero-stage Z] [--eval-seed S]
#
# Both runs start from configs/demo.yaml (tiny size, 16x16 digits, patch 2, global batch 64,
# lr 1e-3) on 2 processes and differ only in the model. DiT: model.arch=dit. Switch-DiT (default):
# the paper's E=3 experts, top-2, every expert on every rank (parallel.ep_size=1), prior loss
# weight 1; `--experts 4 --ep-size 2 --zero-stage 2` gives the demo's layout instead. ZeRO stage 0
# by default, for both models: with parallel.ep_size=1 on 2 processes, stages 1 and 2 stop at
# the first step with a gloo size mismatch (likely a rank whose batch leaves an expert unused has
# no gradient for it), stage 0 trains. The EMA decay is lowered to 0.995 for both so that the first
# evaluation (a third of the way) is not dominated by the initial weights (0.999^600 = 0.55;
# 0.995^600 = 0.05). Checkpoints are written only at the evaluation steps. Running the script again
# with the same --out resumes: finished training runs and evaluations are kept. Evaluations use
# EVAL_THREADS threads (default 2) and the sampling seed --eval-seed (default 0).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=runs/replicate_small
DATA=""
STEPS=1800
SEED=0
PER_CLASS=20
SAMPLING_STEPS=25
NPROC=2
EXPERTS=3
EP_SIZE=1
ZERO_STAGE=0
EVAL_SEED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --per-class) PER_CLASS=$2; shift 2 ;;
    --sampling-steps) SAMPLING_STEPS=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --experts) EXPERTS=$2; shift 2 ;;
    --ep-size) EP_SIZE=$2; shift 2 ;;
    --zero-stage) ZERO_STAGE=$2; shift 2 ;;
    --eval-seed) EVAL_SEED=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "replicate_small.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$STEPS" =~ ^[0-9]+$ ]] || [ "$STEPS" -lt 3 ] || [ $((STEPS % 3)) -ne 0 ]; then
  echo "replicate_small.sh: --steps must be a positive multiple of 3 (three evaluation points)," \
    "got '$STEPS'" >&2
  exit 2
fi
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
SWITCHDIT=("$PYTHON" -m switchdit_dist.cli)
EVERY=$((STEPS / 3))
VAL_EVERY=$((STEPS / 18 > 0 ? STEPS / 18 : 1))
mkdir -p "$OUT"
TIMES="$OUT/wall_seconds.tsv"
log() { echo "[replicate $(date -u +%H:%M:%S)] $*"; }
timed() {  # timed NAME CMD...: runs CMD and appends "NAME<TAB>seconds" to $TIMES
  local name=$1 start=$SECONDS
  shift
  "$@"
  printf '%s\t%d\n' "$name" $((SECONDS - start)) >>"$TIMES"
}

# The digits with a 20% validation split: the same seeded split the digits classifier holds out,
# so the images the Fréchet distance compares against are never trained on.
if [ -z "$DATA" ]; then
  DATA="$OUT/data"
  if [ ! -f "$DATA/manifest.json" ]; then
    timed prepare "${SWITCHDIT[@]}" prepare digits --out "$DATA" --val-fraction 0.2
  fi
fi
if [ ! -f "$DATA/manifest.json" ]; then
  echo "replicate_small.sh: $DATA/manifest.json not found (--data)" >&2
  exit 2
fi
VALIDATION=()
if [ -f "$DATA/val/manifest.json" ]; then
  VALIDATION=(data.validation_shards="$DATA/val/manifest.json" logging.val_every=$VAL_EVERY)
fi

COMMON=(
  data.shards="$DATA/manifest.json" "${VALIDATION[@]}"
  train.steps=$STEPS train.seed=$SEED data.seed=$SEED train.ema_decay=0.995
  parallel.zero_stage=$ZERO_STAGE
  checkpoint.every=$EVERY checkpoint.keep=3 logging.every=$VAL_EVERY logging.progress=false
)
declare -A ARCH=(
  [dit]="model.arch=dit parallel.ep_size=1"
  [switch-dit]="model.arch=switch-dit model.num_experts=$EXPERTS model.top_k=2
    parallel.ep_size=$EP_SIZE model.prior_loss_weight=1.0"
)

for model in dit switch-dit; do
  run="$OUT/$model"
  # shellcheck disable=SC2206  # the overrides are single words
  arch=(${ARCH[$model]})
  log "training $model: $STEPS steps, seed $SEED, checkpoints every $EVERY steps -> $run"
  timed "train_$model" "${SWITCHDIT[@]}" launch --nproc "$NPROC" -- train --config configs/demo.yaml \
    --run-dir "$run" "${arch[@]}" "${COMMON[@]}"
done

# Evaluation runs alone, so it may use both cores.
export OMP_NUM_THREADS=${EVAL_THREADS:-2}
for model in dit switch-dit; do
  run="$OUT/$model"
  for step in $EVERY $((2 * EVERY)) $STEPS; do
    tag=$(printf 'step_%08d' "$step")
    result="$run/eval_$tag.json"
    [ -s "$result" ] && continue
    if [ ! -d "$run/checkpoints/$tag" ]; then
      echo "replicate_small.sh: $run/checkpoints/$tag is missing" >&2
      exit 1
    fi
    log "evaluating $model at step $step"
    "${SWITCHDIT[@]}" convert "$run/checkpoints/$tag" "$run/ema_$tag.safetensors" --weights ema
    timed "eval_${model}_$step" "${SWITCHDIT[@]}" eval --checkpoint "$run/ema_$tag.safetensors" --digits \
      --per-class "$PER_CLASS" --steps "$SAMPLING_STEPS" --sampler ddim --cfg-scale 1.5 \
      --seed "$EVAL_SEED" --device cpu --json >"$result.partial"
    mv "$result.partial" "$result"
  done
done

"$PYTHON" -m switchdit_dist.eval.replicate --out "$OUT" --plot "$OUT/curves.png"
log "plot: $OUT/curves.png; numbers: $OUT/results.json; wall seconds per phase: $TIMES"
cat "$TIMES"
