#!/usr/bin/env bash
# Small-scale replication of Switch-DiT's claim (at equal steps Switch-DiT beats DiT of the same
# size, and converges faster), over several training seeds, on the handwritten digits.
#
#   tools/replicate_small.sh [--seeds 0,1,2] [--out DIR] [--steps 1800] [--eval-every STEPS/3]
#                            [--samples 1000] [--sampling-steps 10] [--spread-seeds 3]
#                            [--docs docs/results.md] [--report-only] [...]
#
# For each training seed (weights, data order, timesteps and noise; the data split is fixed) it
# trains DiT and Switch-DiT (the paper's E=3 D->D linear experts, top-2, prior loss weight 1,
# every expert on every rank) from configs/demo.yaml on 2 processes, ZeRO stage 0, EMA decay
# 0.995, and scores the EMA weights at every evaluation step: --samples class-balanced samples in
# batches (DDIM, guidance 1.5), the same sampling seed and hence the same starting noise for both
# models. The first seed's last checkpoints are also scored with --spread-seeds more sampling
# seeds, measuring the sampling noise apart from the training-seed spread. Then it writes
# OUT/results.md, OUT/results.json, OUT/curves.png and OUT/gates.png (with --docs, the same
# section spliced into that file between its marker comments, figures beside it).
#
# Resumable: a rerun with the same --out skips finished training runs (train.done) and
# evaluations (their JSON); an interrupted training run resumes from its newest checkpoint.
# Every option: python -m switchdit_dist.eval.replicate --help.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,21p' "$0"; exit 0 ;; esac
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
# The report quotes the exact command that produced it.
SWITCHDIT_REPLICATE_COMMAND="tools/replicate_small.sh${*:+ $(printf '%q ' "$@")}"
export SWITCHDIT_REPLICATE_COMMAND="${SWITCHDIT_REPLICATE_COMMAND% }"
exec "$PYTHON" -m switchdit_dist.eval.replicate "$@"
