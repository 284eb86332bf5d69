#!/usr/bin/env bash
# One prepared call that proves and measures every kernel on a bare GPU machine.
#
#   OUT=results_dir scripts/gpu_check.sh [--dry-run] [--deadline SECONDS] [--tests-limit SECONDS]
#                                        [--stages NAME ...]
#
# From the repository root of a fresh copy, with the machine's own python3 and torch:
#   1. builds the extension in place against that torch (pip install -e . --no-build-isolation
#      --no-deps, TORCH_CUDA_ARCH_LIST=9.0 unless set, MAX_JOBS = all cores) and stops at once,
#      loudly, if ranet_fast._C does not import, has no CUDA kernels, or Triton is missing;
#   2. runs the stages of benchmarks/gpu_check.py in order of value under one deadline (default
#      500 s, counted from this script's start): GPU tests at real sizes, every op on every backend
#      against eager with its roofline floor, anytime inference, the training step, real early
#      exit, compute-sanitizer, torch.compile. A stage whose estimate no longer fits is skipped and
#      named; each writes its results as soon as it ends;
#   3. prints a short table last. Files under OUT (default gpu_results/): summary.md,
#      gpu_check.json, log.txt, failures.txt, build.log, sanitizer.log.
#
# All stages take about 12 minutes on an H200, more than one device call may: with a 15-minute
# lease, run --stages tests ops sanitizer, then --stages anytime train early-exit compile
# (benchmarks/gpu_check.py says what each stage took there).
#
# --dry-run: no build (the installed extension is used), every stage on the CPU at tiny sizes.
# That is the rehearsal tests/test_gpu_check.py runs in CI, so a typo cannot cost GPU minutes.
#
# Environment: OUT, PYTHON (default: $RANET_FAST_VENV/bin/python if that venv exists, else python3),
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME, RANET_FAST_COMMIT (the commit to record when the copy
# has no .git).
set -euo pipefail
START_TIME=$(date +%s)
cd "$(dirname "$0")/.."

DRY_RUN=0
DEADLINE=500
TESTS_LIMIT=200
STAGES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --deadline) DEADLINE="$2"; shift ;;
        --tests-limit) TESTS_LIMIT="$2"; shift ;;
        --stages) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do STAGES+=("$1"); shift; done; continue ;;
        *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done

OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x "${RANET_FAST_VENV:-.venv}/bin/python" ]; then
    PY="${RANET_FAST_VENV:-.venv}/bin/python"
else
    PY=python3
fi
if [ -z "${RANET_FAST_COMMIT:-}" ]; then
    RANET_FAST_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
fi
export RANET_FAST_COMMIT

die() {
    echo "gpu_check: FATAL: $*" | tee -a "$OUT/build.log" >&2
    exit 3
}

if [ "$DRY_RUN" = 0 ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$OUT/build.log" || die "nvidia-smi lists no GPU"
    if [ -z "${CUDA_HOME:-}" ]; then
        for candidate in /usr/local/cuda /usr/local/cuda-*; do
            if [ -f "$candidate/include/cuda_runtime.h" ]; then CUDA_HOME="$candidate"; break; fi
        done
    fi
    export CUDA_HOME
    echo "gpu_check: building ranet_fast._C with $("$PY" -c 'import torch; print("torch", torch.__version__)') \
and CUDA_HOME=${CUDA_HOME:-unset}" | tee -a "$OUT/build.log"
    build_start=$(date +%s)
    if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" RANET_FAST_WITH_CUDA=1 \
        "$PY" -m pip install -e . --no-build-isolation --no-deps >> "$OUT/build.log" 2>&1; then
        tail -40 "$OUT/build.log" >&2
        die "the extension build failed (build.log)"
    fi
    echo "gpu_check: built in $(( $(date +%s) - build_start )) s" | tee -a "$OUT/build.log"
fi

# Loud failures before any stage: a missing backend would otherwise show up as skipped tests.
if ! "$PY" - "$DRY_RUN" <<'EOF' 2>&1 | tee -a "$OUT/build.log"; then exit 3; fi
import sys
import torch
from ranet_fast import _extension
dry_run = sys.argv[1] == "1"
problems = []
if not _extension.extension_loaded():
    problems.append(f"ranet_fast._C does not import: {_extension.extension_import_error()}")
elif not dry_run and not _extension.extension_built_with_cuda():
    problems.append("ranet_fast._C was built without CUDA kernels")
if _extension.triton_import_error() is not None:
    problems.append(f"Triton is missing: {_extension.triton_import_error()}")
if not dry_run and not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA GPU")
if problems:
    sys.exit("gpu_check: FATAL: " + "; ".join(problems))
print(f"gpu_check: backends ready: _C with CUDA={_extension.extension_built_with_cuda()}, triton importable, "
      f"GPU={torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (dry run)'}")
EOF

args=(--out "$OUT" --deadline "$DEADLINE" --start-time "$START_TIME" --tests-limit "$TESTS_LIMIT")
[ "$DRY_RUN" = 1 ] && args+=(--dry-run)
[ "${#STAGES[@]}" -gt 0 ] && args+=(--stages "${STAGES[@]}")
exec "$PY" -m benchmarks.gpu_check "${args[@]}"
