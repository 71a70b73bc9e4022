#!/usr/bin/env bash
# Start N local ranks of a training job (CPU + gloo, or one per GPU).
#   launchers/local.sh N configs/demo.yaml RUN_DIR [key=value ...]
set -euo pipefail
nproc=${1:?usage: launchers/local.sh NPROC CONFIG RUN_DIR [key=value ...]}
config=${2:?config file}
run_dir=${3:?run directory}
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
exec "$python" -m switchdit_dist.cli launch --nproc "$nproc" -- train --config "$config" --run-dir "$run_dir" "$@"
