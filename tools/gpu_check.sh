#!/usr/bin/env bash
# One-GPU acceptance run: at most 8 minutes on one H100/H200, no network. With $OUT set, a JSON
# summary goes to $OUT/gpu_check.json (stage logs in $OUT/gpu_check_logs.tar.gz, the sample grid beside).
#
#   bash tools/gpu_check.sh [--cpu-smoke]
#
# Stages (tools/gpu_check.py says what each checks): env, pytest -m gpu, synthetic latents,
# switchdit train of Switch-DiT-S/2 (bf16, ZeRO-2, 60 steps, checkpoint at 30) and its bit-exact
# resume, host syncs per step, convert and sample, bench train of DiT-XL/2 vs Switch-DiT-XL/2.
#
# The GPU machines have Python 3.12 with a CUDA torch but no DeepSpeed, webdataset or their small
# requirements: prepare them here with `tools/gpu_wheels.sh` (git-ignored tools/gpu_wheels/, carried
# along as an ignored path), and this script installs them with pip --no-deps --no-index into a
# scratch folder on PYTHONPATH (or unpacks them where pip is missing). The project runs from this
# checkout. Without CUDA the GPU stages are skipped with the reason and the check exits 0;
# --cpu-smoke runs them on a tiny CPU model instead (minutes; tests the check itself).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export GPU_CHECK_START="${GPU_CHECK_START:-$(date +%s)}"

PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else
        echo "gpu_check: $PY cannot import torch" >&2
        exit 1
    fi
fi

WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK"
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/tools/gpu_wheels}"
SITE="$WORK/site"
install="already importable"

if [ "${GPU_CHECK_INSTALL:-auto}" = always ] || ! "$PY" -c "import deepspeed, webdataset" >/dev/null 2>&1; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        if [ -f "$WHEELS/SHA256SUMS" ] && ! (cd "$WHEELS" && sha256sum --check --quiet SHA256SUMS); then
            echo "gpu_check: wheels in $WHEELS do not match their SHA256SUMS" >&2
        fi
        if "$PY" -m pip --version >/dev/null 2>&1; then
            if "$PY" -m pip install --quiet --no-deps --no-index --disable-pip-version-check \
                --target "$SITE" "$WHEELS"/*.whl; then install="pip --target $SITE"; else
                install="pip install of $WHEELS failed (see above)"
            fi
        else
            # no pip: a wheel is a zip archive of the files to put on the path
            if "$PY" - "$SITE" "$WHEELS"/*.whl <<'EOF'; then install="unpacked into $SITE"; else install="unpacking failed"; fi
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
EOF
        fi
    else
        install="no wheels in $WHEELS (run tools/gpu_wheels.sh and carry tools/gpu_wheels)"
        echo "gpu_check: $install" >&2
    fi
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$SITE" ]; then
    # Any DeepSpeed JIT op built from these sources gets its own build cache:
    # torch keys a cached build by its name only, and another installation's paths would force
    # rebuilds in the shared one.
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}"
fi
echo "[gpu_check] python $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY); wheels: $install; work: $WORK"

notes=$(printf '{"python": "%s", "wheels": "%s", "work": "%s"}' "$PY" "$install" "$WORK")
"$PY" "$ROOT/tools/gpu_check.py" --work "$WORK" --install "$notes" "$@"
