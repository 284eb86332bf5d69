"""What the CUDA tests share: one skip reason, the skip policy, and control of CUDA numerics.

Skips. A test that needs a CUDA GPU skips with ``NO_CUDA_GPU`` (``requires_cuda_gpu``), and one
that only makes sense without a GPU (e.g. compiling for a GPU instead of running on it) with a
reason starting with ``CUDA_GPU_PRESENT``. tests/conftest.py uses ``skip_is_expected`` to fail a CI
run (CI=true) that skipped anything else: a missing extension, Triton or torchrun would otherwise
hide as a skip.

Numerics. Eager PyTorch picks CUDA numerics that a CPU never shows: cuDNN convolutions in float32
use TF32 (10-bit mantissa products, relative error ~1e-3) unless told otherwise, and some CUDA
kernels (cuDNN's weight gradients, ``index_add``) accumulate with atomics, so repeated runs differ
in the last bits. Tests that compare float32 results with eager cuDNN at float32 tolerances use
``exact_float32``; tests that need bitwise-repeatable backward passes (gradcheck's reentrancy
check) use ``deterministic_algorithms``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

NO_CUDA_GPU = "no CUDA GPU"
CUDA_GPU_PRESENT = "CUDA GPU present"
HAS_CUDA_GPU = torch.cuda.is_available()
requires_cuda_gpu = pytest.mark.skipif(not HAS_CUDA_GPU, reason=NO_CUDA_GPU)


def skip_is_expected(reason: str, gpu_visible: bool) -> bool:
    """Whether a skip with ``reason`` is the expected consequence of this machine's GPU (or its absence)."""
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: "):]
    if gpu_visible:
        return reason.startswith(CUDA_GPU_PRESENT)
    return reason == NO_CUDA_GPU


def _new_precision_api() -> bool:
    # torch >= 2.9 has per-backend fp32_precision settings; mixing them with the legacy allow_tf32
    # flags raises ("you have used mix of the legacy and new APIs"), so use the new ones there.
    return hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision")


def numerics_state() -> dict:
    """The process-wide CUDA numerics settings (TF32, cuDNN algorithm choice, determinism)."""
    state = {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }
    if _new_precision_api():
        state["cudnn.conv.fp32_precision"] = torch.backends.cudnn.conv.fp32_precision
        state["cudnn.rnn.fp32_precision"] = torch.backends.cudnn.rnn.fp32_precision
        state["cuda.matmul.fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
    else:
        state["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
        state["cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return state


def restore_numerics(state: dict) -> None:
    torch.backends.cudnn.benchmark = state["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = state["cudnn.deterministic"]
    torch.use_deterministic_algorithms(state["deterministic_algorithms"],
                                       warn_only=state["deterministic_warn_only"])
    if "cudnn.conv.fp32_precision" in state:
        torch.backends.cudnn.conv.fp32_precision = state["cudnn.conv.fp32_precision"]
        torch.backends.cudnn.rnn.fp32_precision = state["cudnn.rnn.fp32_precision"]
        torch.backends.cuda.matmul.fp32_precision = state["cuda.matmul.fp32_precision"]
    else:
        torch.backends.cudnn.allow_tf32 = state["cudnn.allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = state["cuda.matmul.allow_tf32"]


@contextlib.contextmanager
def exact_float32():
    """float32 convolutions and matmuls in IEEE float32, not TF32, until the block ends.

    cuDNN uses TF32 for float32 convolutions by default (torch.backends.cudnn.allow_tf32 = True),
    which puts eager results ~1e-3 off in relative terms: far outside the float32 tolerances
    (1e-5 to 1e-4) of tests that compare our kernels with eager PyTorch.
    """
    state = numerics_state()
    try:
        if _new_precision_api():
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
            torch.backends.cuda.matmul.fp32_precision = "ieee"
        else:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        restore_numerics(state)


@contextlib.contextmanager
def deterministic_algorithms():
    """Deterministic CUDA algorithms (no atomics-based accumulation) until the block ends.

    gradcheck runs each backward twice and requires identical results (its reentrancy check); on
    CUDA, cuDNN's convolution backward and ``index_add`` may sum with atomics and differ in the
    last bits. ``warn_only``: an op without a deterministic implementation warns instead of
    failing the test for a reason unrelated to what it checks.
    """
    state = numerics_state()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        yield
    finally:
        restore_numerics(state)



def deterministic_on(device) -> contextlib.AbstractContextManager:
    """``deterministic_algorithms()`` for a CUDA device; nothing to change on the CPU."""
    return deterministic_algorithms() if torch.device(device).type == "cuda" else contextlib.nullcontext()
