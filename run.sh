#!/usr/bin/env bash
# ranet_fast's one entry point. Each command first sets everything up from nothing (a virtual
# environment in .venv, torch, triton, the ranet_fast._C extension build) and is cheap to repeat.
#
#   ./run.sh demo [trainer flags]   train a small RANet on the synthetic data, evaluate anytime and
#                                   budgeted inference, print a summary and the paths of the plots
#   ./run.sh test [pytest args]     run the test suite
#   ./run.sh setup                  only the set-up
#
# Environment: RANET_FAST_VENV (default .venv), PYTHON (default python3), RANET_FAST_TORCH (the pip
# requirement for torch, default "torch==2.14.1 torchvision==0.29.1"), RANET_FAST_TRITON (the pip
# requirement for triton, default "triton": the newest that fits torch), CUDA_HOME (found if unset),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${RANET_FAST_VENV:-.venv}"
PY="$VENV/bin/python"

# The toolkit root that holds include/cuda_runtime.h. The nvcc on PATH may be a wrapper script in
# another folder, so torch's guess from its location can be wrong.
find_cuda_home() {
    local candidate
    for candidate in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
        if [ -n "$candidate" ] && [ -f "$candidate/include/cuda_runtime.h" ] && [ -x "$candidate/bin/nvcc" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# pip's requirement strings for what the set-up installs; a venv whose recorded requirements differ
# (another RANET_FAST_TORCH, say) gets them installed again, so one venv never silently keeps an
# older stack.
TORCH_REQUIREMENT="${RANET_FAST_TORCH:-torch==2.14.1 torchvision==0.29.1}"
TRITON_REQUIREMENT="${RANET_FAST_TRITON:-triton}"
# What setup.py needs to build the editable install with --no-build-isolation (pyproject.toml's
# build-system.requires, less torch): installed explicitly, because with build isolation off pip does
# not, and what torch happens to pull in differs between torch releases (2.11.0 brings no wheel
# and leaves the venv's setuptools 65.5, which cannot build an editable wheel).
BUILD_REQUIREMENTS=("setuptools>=64" wheel ninja)

setup() {
    [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
    local stamp="$VENV/.ranet_fast_requirements" wanted
    wanted="$TORCH_REQUIREMENT | $TRITON_REQUIREMENT | ${BUILD_REQUIREMENTS[*]}"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || ! "$PY" -c "import torch, torchvision, setuptools, wheel, ninja" 2>/dev/null; then
        "$PY" -m pip install -q "${BUILD_REQUIREMENTS[@]}"
        # torch and triton in one resolver run, so that a pinned triton is checked against the one
        # torch requires instead of being replaced by it afterwards.
        # shellcheck disable=SC2086 # the requirement lists are meant to split
        if "$PY" -m pip install -q $TORCH_REQUIREMENT $TRITON_REQUIREMENT; then
            echo "$wanted" > "$stamp"
        else
            # Triton is optional (no wheel for this platform, say): the Triton backend then reports
            # itself unavailable. torch is not. No stamp, so the next set-up tries triton again.
            echo "run.sh: torch with $TRITON_REQUIREMENT could not be installed; trying without triton" >&2
            # shellcheck disable=SC2086
            "$PY" -m pip install -q $TORCH_REQUIREMENT
        fi
    fi
    local cuda_home
    if cuda_home=$(find_cuda_home); then
        export CUDA_HOME="$cuda_home"
    else
        echo "run.sh: no CUDA toolkit found; building the CPU-only extension" >&2
    fi
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation -e ".[test]"
    "$PY" -m ranet_fast.env
}

command="${1:-}"
shift || true
case "$command" in
    setup) setup ;;
    test)
        setup
        exec "$PY" -m pytest -q "$@" tests
        ;;
    demo)
        setup
        exec "$PY" -m ranet_fast.demo "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test|setup [args]" >&2
        exit 2
        ;;
esac
