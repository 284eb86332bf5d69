#!/usr/bin/env bash
# ranet_fast's one entry point. Each command first sets everything up from nothing (a virtual
# environment in .venv, torch, triton, the ranet_fast._C extension build) and is cheap to repeat.
#
#   ./run.sh demo [trainer flags]   train a small RANet on the synthetic data, evaluate anytime and
#                                   budgeted inference, print a summary and the paths of the plots
#   ./run.sh test [pytest args]     run the test suite
#   ./run.sh test-device-stack [pytest args]
#                                   the op, model, Triton-interpreter and packaging tests on the GPU
#                                   machine's stack (torch 2.11.0, torchvision 0.26.0, triton 3.6.0),
#                                   in a venv of its own with a regular (non-editable) install from
#                                   its own copy of the sources (see below)
#   ./run.sh setup                  only the set-up
#
# Environment: RANET_FAST_VENV (default .venv), PYTHON (default python3), RANET_FAST_TORCH (the pip
# requirement for torch, default "torch==2.14.1 torchvision==0.29.1"), RANET_FAST_TRITON (the pip
# requirement for triton, default "triton": the newest that fits torch), CUDA_HOME (found if unset),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"; "9.0" for test-device-stack), MAX_JOBS (default: all
# cores), RANET_FAST_DEVICE_VENV (test-device-stack's venv, default .venv-device).
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

# The venv with torch, triton and the build requirements (not yet ranet_fast); CUDA_HOME exported
# when a toolkit is found.
prepare_venv() {
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
}

# pip install of the checkout with its test extras, against the venv's torch; "$@" adds pip options
# (-e for the editable install).
install_ranet_fast() {
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install -q --no-build-isolation "$@" ".[test]"
}

# What the venv's ranet_fast finds: extension, Triton, backends.
report_environment() {
    "$PY" -m ranet_fast.env
    # CI (CI=true) on a machine with a CUDA toolkit: a _C without CUDA kernels, or no Triton, fails here.
    if [[ "${CI:-}" =~ ^(1|true|yes)$ ]] && find_cuda_home >/dev/null; then "$PY" -m ranet_fast.env --require cuda-build,triton; fi
}

# The development venv: the checkout installed in editable mode, so edits take effect without a
# reinstall (C++/CUDA ones after the rebuild this reinstall does).
setup() {
    prepare_venv
    install_ranet_fast -e
    report_environment
}

# The GPU machine's stack (an H200 with Python 3.12, torch 2.11.0+cu130, torchvision 0.26.0, triton
# 3.6.0, nvcc 13.0; nothing can be installed there), on which the project must build and pass its
# tests as well as on the pins above. torch 2.11.0's PyPI wheel is the CUDA 13.0 build, so the
# extension's CUDA kernels compile here with nvcc 13.0 as they will there.
DEVICE_STACK_TORCH="torch==2.11.0 torchvision==0.26.0"
# numpy<2.4 only for triton 3.6's interpreter, which converts one-element arrays with int() where
# numpy 2.4 raises "only 0-dimensional arrays can be converted to Python scalars" (e.g. range() over a
# kernel argument; triton-lang/triton#9171, fixed after 3.6). Compiled kernels never run that code,
# so the GPU machine's numpy 2.5 does not matter there; rewriting the kernels' loops as while loops
# to dodge it would cost the GPU the software pipelining of its for loops.
DEVICE_STACK_TRITON="triton==3.6.0 numpy<2.4"
# The ops (each against its reference, autograd, opcheck/torch.compile), the fast layers in eval and
# train mode, the models and early exit, and the Triton kernels under the interpreter: what runs on
# the GPU machine; and the packaging checks, which here run against the regular (non-editable)
# install. Left out: the trainer, DDP, interrupt, data, checkpoint, benchmark and script tests,
# which exercise Python around the ops rather than the device stack (the main suite runs them).
DEVICE_STACK_TESTS=(
    tests/test_exit_confidence.py tests/test_exit_partition.py tests/test_scatter_exits.py
    tests/test_gather_rows.py tests/test_upsample_concat.py tests/test_upsample_concat_triton.py
    tests/test_fused_conv2d.py tests/test_fused_conv2d_triton.py
    tests/test_batch_norm_relu.py tests/test_batch_norm_relu_triton.py tests/test_fuzz_ops.py
    tests/test_dense_layers.py tests/test_fusion_layers.py tests/test_train_mode.py
    tests/test_models.py tests/test_msdnet.py tests/test_early_exit.py tests/test_optimize.py
    tests/test_convert.py tests/test_env.py tests/test_packaging.py
)

# Copies the working tree's sources (tracked files and untracked ones git does not ignore) to $1,
# replacing what was there. test-device-stack builds and tests in that copy: the build writes its
# objects under build/ in the source tree, and objects or a _C built against torch 2.11.0 in the
# checkout would be picked up by .venv's build (both are cpython-311 here, so the file names are the
# same).
copy_sources() {
    local destination="$1"
    git rev-parse --is-inside-work-tree >/dev/null 2>&1 \
        || { echo "run.sh: test-device-stack copies the sources with git ls-files; run it in a git checkout" >&2; exit 2; }
    rm -rf "$destination"
    mkdir -p "$destination"
    # --cached lists files deleted from the working tree too; those are skipped.
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' path; do if [ -e "$path" ]; then printf '%s\0' "$path"; fi; done \
        | tar --null -T - -cf - | tar -xf - -C "$destination"
}

test_device_stack() {
    local venv="${RANET_FAST_DEVICE_VENV:-.venv-device}"
    case "$venv" in /*) ;; *) venv="$(pwd)/$venv" ;; esac
    VENV="$venv"
    PY="$VENV/bin/python"
    TORCH_REQUIREMENT="$DEVICE_STACK_TORCH"
    TRITON_REQUIREMENT="$DEVICE_STACK_TRITON"
    # The H200 only: half the nvcc work of the default list.
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    # With a toolkit at hand the CUDA kernels must build against this torch (the point of the
    # exercise): setup.py then fails instead of quietly building the CPU-only extension.
    if find_cuda_home >/dev/null; then
        export RANET_FAST_WITH_CUDA="${RANET_FAST_WITH_CUDA:-1}"
    fi
    copy_sources "$VENV/src"
    cd "$VENV/src"
    prepare_venv
    # A regular (non-editable) install, as a user's pip install . makes, then the package sources
    # removed from the copy: everything below imports the installed ranet_fast, so a module, kernel
    # or benchmark the wheel lacks fails here instead of being found in the source tree.
    install_ranet_fast
    rm -rf ranet_fast kernels benchmarks
    report_environment
    # A header the CI log can be searched for, and a check that the venv holds the pinned stack and
    # a working extension (the tests would otherwise pass on the reference fallbacks).
    "$PY" - "$DEVICE_STACK_TORCH $DEVICE_STACK_TRITON" <<'EOF'
import platform
import sys
import sysconfig

import numpy
import torch
import torchvision

import ranet_fast
from ranet_fast import _extension

triton_error = _extension.triton_import_error()
triton_version = "missing" if triton_error else __import__("triton").__version__
extension = ("not loaded: " + str(_extension.extension_import_error()) if not _extension.extension_loaded()
             else "with CUDA kernels" if _extension.extension_built_with_cuda() else "CPU kernels only")
line = "=" * 100
print(f"{line}\nDEVICE STACK: torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision "
      f"{torchvision.__version__}, triton {triton_version}, numpy {numpy.__version__}, "
      f"python {platform.python_version()}\nranet_fast._C: {extension}\n{line}", flush=True)
installed = {"torch": torch.__version__, "torchvision": torchvision.__version__, "triton": triton_version}
problems = [f"{name} is {installed[name]}, not {version}"
            for name, _, version in (pin.partition("==") for pin in sys.argv[1].split() if "==" in pin)
            if installed[name].split("+")[0] != version]
if not _extension.extension_loaded():
    problems.append(f"ranet_fast._C does not import ({_extension.extension_import_error()})")
if triton_error:
    problems.append(f"triton does not import ({triton_error})")
site_packages = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
if not any(ranet_fast.__file__.startswith(directory) for directory in site_packages):
    problems.append(f"ranet_fast is imported from {ranet_fast.__file__}, not from the installed package")
if problems:
    sys.exit("run.sh test-device-stack: " + "; ".join(problems))
EOF
    exec "$PY" -m pytest -q "$@" "${DEVICE_STACK_TESTS[@]}"
}

command="${1:-}"
shift || true
case "$command" in
    setup) setup ;;
    test)
        setup
        exec "$PY" -m pytest -q -rs "$@" tests
        ;;
    test-device-stack) test_device_stack "$@" ;;
    demo)
        setup
        exec "$PY" -m ranet_fast.demo "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test|test-device-stack|setup [args]" >&2
        exit 2
        ;;
esac
