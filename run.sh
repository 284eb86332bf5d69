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
# requirement for torch, default "torch==2.14.1 torchvision==0.29.1"), CUDA_HOME (found if unset),
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

setup() {
    [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
    if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
        # shellcheck disable=SC2086 # the requirement list is meant to split
        "$PY" -m pip install -q ${RANET_FAST_TORCH:-torch==2.14.1 torchvision==0.29.1}
    fi
    "$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton \
        || echo "run.sh: triton could not be installed; the Triton backend will report itself unavailable" >&2
    # ninja lets torch's extension builder compile in parallel (MAX_JOBS) and incrementally.
    "$PY" -c "import ninja" 2>/dev/null || "$PY" -m pip install -q ninja
    local cuda_home
    if cuda_home=$(find_cuda_home); then
        export CUDA_HOME="$cuda_home"
    else
        echo "run.sh: no CUDA toolkit found; building the CPU-only extension" >&2
    fi
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation -e ".[test]"
    "$PY" -m ranet_fast.env
    # CI (CI=true) on a machine with a CUDA toolkit: a _C without CUDA kernels, or no Triton, fails here.
    if [[ "${CI:-}" =~ ^(1|true|yes)$ ]] && find_cuda_home >/dev/null; then "$PY" -m ranet_fast.env --require cuda-build,triton; fi
}

command="${1:-}"
shift || true
case "$command" in
    setup) setup ;;
    test)
        setup
        exec "$PY" -m pytest -q -rs "$@" tests
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
