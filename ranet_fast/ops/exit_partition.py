"""exit_partition: which samples leave at an exit, as a stable partition.

For logits of shape [N, C], a threshold and a criterion the op returns

* ``confidence[N]`` -- float32 (float64 for float64 logits):
  ``"max_softmax"``: the largest softmax probability (as exit_confidence);
  ``"entropy"``: ``1 - H(p) / log C`` with ``H(p) = -sum_c p_c log p_c`` the
  natural-log entropy of the softmax (``0 log 0 = 0``), in [0, 1], higher is
  more confident; 1 when C == 1;
* ``prediction[N]`` -- the argmax of each row (int64, as torch.argmax);
* ``order[N]`` -- int64, the indices of the continuing samples in increasing
  order followed by those of the leaving samples in increasing order;
* ``num_continue`` -- a 0-dim int64 tensor on the logits' device: how many
  samples continue. The op never synchronises with the host; the caller reads
  ``int(num_continue)`` once per exit to slice ``order[:num_continue]``.

A sample leaves when ``confidence >= threshold``, compared in the confidence's
dtype (as ``tensor >= float`` in PyTorch). A NaN confidence (a row with a NaN,
a +inf or only -inf logits) never leaves. The threshold -inf lets every other
sample leave, +inf keeps all; a NaN threshold is refused.

Like exit_confidence this is a decision, not a training signal: the input is
detached and the outputs never require grad.

The scatter form, what the early-exit engine runs at every exit,

    order, num_continue = exit_partition_scatter(logits, threshold, criterion, positions,
                                                 exit_index, result_logits, result_exit)

is exit_partition followed by scatter_exits of its leaving rows (see
ranet_fast.ops.scatter_exits: ``result_logits[positions[r]] = logits[r]`` and
``result_exit[positions[r]] = exit_index`` for every leaving row r), in one
pass over the logits: leaving is decided row by row, so the kernel that folds
a row also copies it when it leaves, and only the partition of the N
decisions follows. It returns what the engine needs next (the order and the
count); confidence and prediction are not materialised.
"""

from __future__ import annotations

import math

import torch

from ._registry import FUNCTIONAL, Form, OpSpec, register, run, triton_kernels
from .exit_confidence import exit_confidence_reference, validate_logits
from .scatter_exits import scatter_exits_reference, validate_result_writes

CRITERIA = ("max_softmax", "entropy")


def _confidence_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def validate_exit_partition_args(logits: object, threshold: object, criterion: object,
                                 op_name: str = "exit_partition") -> None:
    """Raises TypeError/ValueError naming the bad argument (and ``op_name``, the op being called)."""
    validate_logits(logits, op_name=op_name)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, torch.SymFloat)):
        raise TypeError(f"{op_name} expects threshold to be a Python float, got {type(threshold).__name__}")
    # Not math.isnan: under torch.compile(dynamic=True) the threshold is a
    # SymFloat, which the comparison handles and math.isnan does not.
    if threshold != threshold:
        raise ValueError(f"{op_name}: threshold is NaN; use -inf (every sample leaves) or +inf (none leaves)")
    if criterion not in CRITERIA:
        raise ValueError(f"{op_name}: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def _entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    probabilities = torch.softmax(logits.to(_confidence_dtype(logits.dtype)), dim=1)
    # xlogy(0, 0) == 0: classes with zero probability add nothing.
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=1)
    num_classes = logits.shape[1]
    # For C == 1 the entropy is 0 (or NaN), and log C would divide by zero.
    confidence = 1.0 - (entropy / math.log(num_classes) if num_classes > 1 else entropy)
    # The exact value lies in [0, 1]; rounding can step just outside (a uniform
    # row's computed entropy can exceed the computed log C). clamp keeps NaN.
    return confidence.clamp(0.0, 1.0)


def stable_partition(leaves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, num_continue) for a bool [N] mask of leaving samples, without a host sync."""
    # A stable sort on the 0/1 key puts continuing (0) before leaving (1)
    # samples and keeps increasing indices within each group.
    order = torch.argsort(leaves.to(torch.uint8), stable=True)
    num_continue = (~leaves).sum(dtype=torch.int64)
    return order, num_continue


def exit_partition_reference(
    logits: torch.Tensor, threshold: float, criterion: str = "max_softmax"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch exit_partition: the definition the kernels are tested against.

    Computes the confidence in float32 (float64 for float64 logits). Runs on
    any device; also the fallback when no compiled or Triton kernel applies.
    """
    validate_exit_partition_args(logits, threshold, criterion)
    logits = logits.detach()
    if criterion == "max_softmax":
        confidence, prediction = exit_confidence_reference(logits)
    else:
        confidence = _entropy_confidence(logits)
        prediction = torch.argmax(logits, dim=1)
    order, num_continue = stable_partition(confidence >= threshold)
    return confidence, prediction, order, num_continue


def _fake_exit_partition(
    logits: torch.Tensor, threshold: float, criterion: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(logits.dim() == 2, lambda: f"expected [N, C] logits, got shape {tuple(logits.shape)}")
    torch._check(logits.shape[1] >= 1, lambda: "exit_partition needs C >= 1")
    num_rows = logits.shape[0]
    confidence = logits.new_empty(num_rows, dtype=_confidence_dtype(logits.dtype))
    prediction = logits.new_empty(num_rows, dtype=torch.int64)
    order = logits.new_empty(num_rows, dtype=torch.int64)
    num_continue = logits.new_empty((), dtype=torch.int64)
    return confidence, prediction, order, num_continue


def _exit_partition_triton(
    logits: torch.Tensor, threshold: float, criterion: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_kernels(SPEC.triton_module).exit_partition_triton(logits, threshold, criterion)


def validate_exit_partition_scatter_args(logits: object, threshold: object, criterion: object, positions: object,
                                         exit_index: object, result_logits: object, result_exit: object) -> None:
    """exit_partition's checks, then scatter_exits' checks of the writes; raises TypeError/ValueError."""
    validate_exit_partition_args(logits, threshold, criterion, op_name="exit_partition_scatter")
    validate_result_writes("exit_partition_scatter", logits, positions, exit_index, result_logits, result_exit)


def exit_partition_scatter_reference(
    logits: torch.Tensor, threshold: float, criterion: str, positions: torch.Tensor, exit_index: int,
    result_logits: torch.Tensor, result_exit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch exit_partition_scatter: the two references in sequence, by definition."""
    validate_exit_partition_scatter_args(logits, threshold, criterion, positions, exit_index, result_logits,
                                         result_exit)
    _, _, order, num_continue = exit_partition_reference(logits, threshold, criterion)
    scatter_exits_reference(result_logits, result_exit, logits.detach(), order, num_continue, positions, exit_index)
    return order, num_continue


def _fake_exit_partition_scatter(
    logits: torch.Tensor, threshold: float, criterion: str, positions: torch.Tensor, exit_index: int,
    result_logits: torch.Tensor, result_exit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(logits.dim() == 2, lambda: f"expected [N, C] logits, got shape {tuple(logits.shape)}")
    torch._check(result_logits.dim() == 2 and result_logits.shape[1] == logits.shape[1],
                 lambda: "exit_partition_scatter expects result_logits of shape [M, C]")
    return logits.new_empty(logits.shape[0], dtype=torch.int64), logits.new_empty((), dtype=torch.int64)


def _exit_partition_scatter_triton(
    logits: torch.Tensor, threshold: float, criterion: str, positions: torch.Tensor, exit_index: int,
    result_logits: torch.Tensor, result_exit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return triton_kernels(SCATTER_SPEC.triton_module).exit_partition_scatter_triton(
        logits, threshold, criterion, positions, exit_index, result_logits, result_exit)


SPEC = OpSpec("exit_partition", "exit_partition", {
    FUNCTIONAL: Form(triton=_exit_partition_triton, reference=exit_partition_reference, fake=_fake_exit_partition),
})
register(SPEC)
# The scatter form is an op of its own (its schema differs), with its kernels beside exit_partition's.
SCATTER_SPEC = OpSpec("exit_partition_scatter", "exit_partition", {
    FUNCTIONAL: Form(triton=_exit_partition_scatter_triton, reference=exit_partition_scatter_reference,
                     fake=_fake_exit_partition_scatter, mutates_args=("result_logits", "result_exit")),
})
register(SCATTER_SPEC)


def exit_partition(
    logits: torch.Tensor, threshold: float, criterion: str = "max_softmax", backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence, prediction and the stable continue/leave partition of [N, C] logits.

    Args:
        logits: float16/bfloat16/float32/float64 tensor of shape [N, C], C >= 1,
            any strides. Its autograd history is ignored.
        threshold: a sample leaves when its confidence >= threshold; not NaN.
        criterion: "max_softmax" or "entropy" (see the module docstring).
        backend: None (automatic, or the RANET_FAST_BACKEND environment variable),
            "cuda", "triton", "cpu" or "reference"; see ranet_fast._extension.

    Returns:
        (confidence, prediction, order, num_continue) on the logits' device:
        [N] float32 (float64 for float64 logits), [N] int64, [N] int64 and a
        0-dim int64 tensor.
    """
    validate_exit_partition_args(logits, threshold, criterion)
    if isinstance(threshold, int):
        # The schemas take a float; a SymFloat stays symbolic under torch.compile.
        threshold = float(threshold)
    return run(SPEC, backend, logits.detach(), threshold, criterion)


def exit_partition_scatter(
    logits: torch.Tensor, threshold: float, criterion: str, positions: torch.Tensor, exit_index: int,
    result_logits: torch.Tensor, result_exit: torch.Tensor, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """exit_partition and scatter_exits of the leaving rows in one pass (see the module docstring).

    Args:
        logits, threshold, criterion: as exit_partition's.
        positions: [N] int64, the original batch position of each row, each in [0, M) (the CPU
            kernel checks every one before writing; the CUDA kernel asserts those it uses).
        exit_index: int >= 0, written to result_exit for the leaving rows.
        result_logits: [M, C] tensor of the logits' dtype, any strides (written).
        result_exit: [M] int64 tensor (written).
        backend: None (automatic, or the RANET_FAST_BACKEND environment variable),
            "cuda", "triton", "cpu" or "reference"; see ranet_fast._extension.

    Returns:
        (order, num_continue) as exit_partition's, on the logits' device; no host sync.
    """
    validate_exit_partition_scatter_args(logits, threshold, criterion, positions, exit_index, result_logits,
                                         result_exit)
    if isinstance(threshold, int):
        threshold = float(threshold)
    return run(SCATTER_SPEC, backend, logits.detach(), threshold, criterion, positions, exit_index, result_logits,
               result_exit)
