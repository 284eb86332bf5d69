#!/usr/bin/env bash
# Run NVIDIA compute-sanitizer over the CUDA kernels' tests and write a report.
#
#   scripts/sanitize_cuda.sh [REPORT_DIR]      (default: sanitizer_report)
#
# For each tool (memcheck with leak checking, racecheck, initcheck, synccheck) it runs the CUDA
# cases of the op tests (pytest -k "$RANET_FAST_SANITIZE_SELECT", default "cuda or gpu") under
# `compute-sanitizer --tool TOOL`, keeps each tool's full log in REPORT_DIR/TOOL.log and writes
# REPORT_DIR/summary.md: the tool, pytest's exit status and the sanitizer's error count. Zero
# errors everywhere is the expected result; the script exits 1 otherwise, and 2 when it cannot
# run (no GPU, no compute-sanitizer, an extension built without CUDA) - checked before any run.
#
# PyTorch's caching allocator hands out memory that earlier tensors wrote, which hides
# uninitialised reads from initcheck and out-of-bounds accesses inside a cached block from
# memcheck, so it is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1).
#
# Environment: PYTHON (default "${RANET_FAST_VENV:-.venv}/bin/python", the set-up's venv), CUDA_HOME (to find
# compute-sanitizer when it is not on PATH), RANET_FAST_SANITIZE_TOOLS (default
# "memcheck racecheck initcheck synccheck"), RANET_FAST_SANITIZE_SELECT (the pytest -k expression).
set -euo pipefail
cd "$(dirname "$0")/.."

REPORT_DIR="${1:-sanitizer_report}"
TOOLS="${RANET_FAST_SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}"
SELECT="${RANET_FAST_SANITIZE_SELECT:-cuda or gpu}"
TESTS=(tests/test_exit_confidence.py tests/test_exit_partition.py tests/test_scatter_exits.py
       tests/test_gather_rows.py tests/test_upsample_concat.py tests/test_upsample_concat_triton.py
       tests/test_fused_conv2d.py tests/test_fused_conv2d_triton.py
       tests/test_batch_norm_relu.py tests/test_batch_norm_relu_triton.py
       tests/test_dense_layers.py tests/test_train_mode.py)

fail() {
    echo "sanitize_cuda: $*" >&2
    exit 2
}

# The set-up's venv (run.sh's RANET_FAST_VENV), whose torch the extension was built against; a bare
# python3 would usually have no torch at all. PYTHON overrides.
PY="${PYTHON:-${RANET_FAST_VENV:-.venv}/bin/python}"

# Cheapest check first: without a driver there is no GPU to sanitise.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    fail "no CUDA GPU visible (nvidia-smi is missing or lists no device); compute-sanitizer needs one. Run this script on a GPU machine."
fi
[ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 \
    || fail "no Python at $PY: run ./run.sh setup first (RANET_FAST_VENV names its venv), or set PYTHON"
"$PY" - <<'EOF' || exit 2
import sys
import torch
from ranet_fast import _extension
if not torch.cuda.is_available():
    sys.exit(f"sanitize_cuda: torch {torch.__version__} sees no CUDA GPU (a CPU-only build of torch?)")
if not _extension.extension_built_with_cuda():
    sys.exit("sanitize_cuda: ranet_fast._C was built without CUDA kernels "
             f"({_extension.extension_import_error() or 'CPU-only build'}); rebuild with a CUDA toolkit: "
             "RANET_FAST_WITH_CUDA=1 ./run.sh setup")
EOF

SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ]; then
    for candidate in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
        if [ -n "$candidate" ] && [ -x "$candidate/bin/compute-sanitizer" ]; then
            SANITIZER="$candidate/bin/compute-sanitizer"
            break
        fi
    done
fi
[ -n "$SANITIZER" ] || fail "compute-sanitizer not found on PATH or under CUDA_HOME/bin; install the CUDA toolkit"

mkdir -p "$REPORT_DIR"
SUMMARY="$REPORT_DIR/summary.md"
{
    echo "# compute-sanitizer report"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
    echo "- $("$SANITIZER" --version | tail -1)"
    echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    echo "- tests: ${TESTS[*]} -k \"$SELECT\""
    echo
    echo "| tool | pytest exit status | sanitizer errors |"
    echo "|---|---|---|"
} > "$SUMMARY"

status=0
for tool in $TOOLS; do
    log="$REPORT_DIR/$tool.log"
    extra=()
    [ "$tool" = memcheck ] && extra=(--leak-check full)
    echo "sanitize_cuda: $tool ..." >&2
    set +e
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" "${extra[@]}" --target-processes all \
        --log-file "$log" --print-limit 100 \
        "$PY" -m pytest -q -p no:cacheprovider -k "$SELECT" "${TESTS[@]}" > "$REPORT_DIR/$tool.pytest.txt" 2>&1
    pytest_status=$?
    set -e
    # One "ERROR SUMMARY: N errors" line per sanitised process; add them up.
    errors=$(grep -ho 'ERROR SUMMARY: [0-9]*' "$log" | awk '{ total += $3 } END { print total + 0 }')
    processes=$(grep -c 'ERROR SUMMARY' "$log" || true)
    echo "| $tool | $pytest_status | $errors (in $processes processes) |" >> "$SUMMARY"
    if [ "$pytest_status" -ne 0 ] || [ "$errors" -ne 0 ] || [ "$processes" -eq 0 ]; then
        status=1
    fi
done
echo >> "$SUMMARY"
echo "pytest output per tool: $REPORT_DIR/TOOL.pytest.txt; sanitizer logs: $REPORT_DIR/TOOL.log" >> "$SUMMARY"
cat "$SUMMARY"
exit "$status"
