#!/usr/bin/env bash
# Prepare the wheels tools/gpu_check.sh installs on a GPU machine that has no network.
#
#   tools/gpu_wheels.sh [DIR]        (default tools/gpu_wheels, git-ignored)
#
# Run it on a machine with PyPI access. The GPU machines have Python 3.12 with a CUDA torch and the
# common scientific packages, but not DeepSpeed, webdataset or their few pure-Python requirements:
# those are brought along here (DeepSpeed's source package builds a pure-Python wheel in seconds, no
# ops compiled), plus pydantic-core as a CPython 3.12 manylinux binary. The project itself is not
# packaged: the check runs the checked-out tree, so it never tests a stale wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/tools/gpu_wheels}"
PYVER="${GPU_PYTHON_VERSION:-3.12}"  # the GPU machines' interpreter
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

# The versions the suite runs with (constraints-cpu.txt, pyproject.toml); the rest as installed here.
PURE=(
    deepspeed==0.19.8
    webdataset==1.0.2
    hjson==3.1.0
    braceexpand==0.1.7
)
# pydantic pins its pydantic-core exactly; both, and pydantic's small requirements, as binaries
# for the GPU machines' interpreter.
BINARY=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# PIP_CONSTRAINT: a machine-wide constraints file must not pull a torch into these no-deps builds.
export PIP_CONSTRAINT=""
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "${PURE[@]}"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --abi "cp${PYVER/./}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --dest "$DIR" "${BINARY[@]}"

expected=$(( ${#PURE[@]} + ${#BINARY[@]} ))
found=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$found" -ne "$expected" ]; then
    echo "gpu_wheels: expected $expected wheels in $DIR, found $found" >&2
    ls -l "$DIR" >&2
    exit 1
fi
( cd "$DIR" && sha256sum ./*.whl > SHA256SUMS )
echo "gpu_wheels: $found wheels in $DIR ($(du -sh "$DIR" | cut -f1)):"
ls -1 "$DIR"/*.whl | xargs -n1 basename
