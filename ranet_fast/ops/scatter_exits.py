"""scatter_exits: write the samples leaving at one exit into the full-batch results.

After ``confidence, prediction, order, num_continue = exit_partition(logits, ...)``
on the still-running batch of N samples,

    scatter_exits(result_logits, result_exit, logits, order, num_continue, positions, exit_index)

does, in place, for every slot ``j`` in ``[num_continue, N)`` (the leaving samples):

    r = order[j]; p = positions[r]
    result_logits[p, :] = logits[r, :]
    result_exit[p] = exit_index

``positions[r]`` is the original batch position of live sample ``r``. The op
reads ``num_continue`` on the device, so it never synchronises with the host.
Rows of the results that no leaving sample maps to are left untouched. Distinct
leaving samples must have distinct positions (as the positions of a batch are);
if two shared one, which of them ends up there would be unspecified.

Index values live on the device, so the Python checks cover shapes, dtypes and
devices; the CPU kernel checks the values, the CUDA kernel asserts them.
"""

from __future__ import annotations

import torch

from ._checks import require_no_overlap
from ._registry import FUNCTIONAL, Form, OpSpec, register, run, triton_kernels
from .exit_confidence import SUPPORTED_DTYPES


def _require_tensor(op_name: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op_name} expects {name} to be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_index_vector(op_name: str, name: str, tensor: torch.Tensor, size: int, size_name: str) -> None:
    if tensor.dim() != 1 or tensor.shape[0] != size:
        raise ValueError(
            f"{op_name} expects {name} of shape [{size_name}] = [{size}]; got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype != torch.int64:
        raise TypeError(f"{op_name} expects {name} to be int64, got {tensor.dtype}")


def validate_result_writes(op_name: str, logits: torch.Tensor, positions: object, exit_index: object,
                           result_logits: object, result_exit: object, **other_tensors: object) -> None:
    """The checks of an op that writes leaving rows of [N, C] ``logits`` (already checked) into the results:
    result_logits [M, C] of the logits' dtype, result_exit [M] int64, positions [N] int64, an int exit_index
    >= 0, every tensor (``other_tensors`` too) on the logits' device, results without shared elements.
    Shared by scatter_exits and exit_partition_scatter; raises TypeError/ValueError naming the argument."""
    tensors = {name: _require_tensor(op_name, name, value) for name, value in
               (("result_logits", result_logits), ("result_exit", result_exit), ("positions", positions))}
    num_rows, num_classes = logits.shape
    if result_logits.dim() != 2 or result_logits.shape[1] != num_classes:
        raise ValueError(
            f"{op_name} expects result_logits of shape [M, C] with C = {num_classes} (the logits' "
            f"class count); got shape {tuple(result_logits.shape)}"
        )
    if result_logits.dtype != logits.dtype:
        raise TypeError(
            f"{op_name} expects result_logits of the logits' dtype {logits.dtype}; got {result_logits.dtype}"
        )
    _require_index_vector(op_name, "result_exit", result_exit, result_logits.shape[0], "M")
    _require_index_vector(op_name, "positions", positions, num_rows, "N")
    if isinstance(exit_index, bool) or not isinstance(exit_index, int):
        raise TypeError(f"{op_name} expects exit_index to be an int, got {type(exit_index).__name__}")
    if exit_index < 0:
        raise ValueError(f"{op_name} expects exit_index >= 0, got {exit_index}")
    for name, tensor in {**tensors, **other_tensors}.items():
        if tensor.device != logits.device:
            raise ValueError(
                f"{op_name} expects every tensor on the logits' device {logits.device}; "
                f"{name} is on {tensor.device}"
            )
    require_no_overlap(op_name, "result_logits", result_logits)
    require_no_overlap(op_name, "result_exit", result_exit)


def validate_scatter_exits_args(
    result_logits: object,
    result_exit: object,
    logits: object,
    order: object,
    num_continue: object,
    positions: object,
    exit_index: object,
) -> None:
    """Raises TypeError/ValueError naming the bad argument."""
    op_name = "scatter_exits"
    for name, value in (("result_logits", result_logits), ("result_exit", result_exit), ("logits", logits),
                        ("order", order), ("num_continue", num_continue), ("positions", positions)):
        _require_tensor(op_name, name, value)
    if logits.dim() != 2:
        raise ValueError(f"scatter_exits expects logits of shape [N, C]; got shape {tuple(logits.shape)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scatter_exits supports float16, bfloat16, float32 and float64 logits; got {logits.dtype}")
    _require_index_vector(op_name, "order", order, logits.shape[0], "N")
    if num_continue.dim() != 0 or num_continue.dtype != torch.int64:
        raise TypeError(
            "scatter_exits expects num_continue to be a 0-dim int64 tensor (exit_partition's); "
            f"got shape {tuple(num_continue.shape)} and dtype {num_continue.dtype}"
        )
    validate_result_writes(op_name, logits, positions, exit_index, result_logits, result_exit, order=order,
                           num_continue=num_continue)


def scatter_exits_reference(
    result_logits: torch.Tensor,
    result_exit: torch.Tensor,
    logits: torch.Tensor,
    order: torch.Tensor,
    num_continue: torch.Tensor,
    positions: torch.Tensor,
    exit_index: int,
) -> None:
    """Pure-PyTorch scatter_exits: the definition the kernels are tested against.

    Runs on any device without a host sync: instead of slicing ``order`` at
    num_continue it routes the continuing slots to a scratch row M that is
    dropped afterwards. Also the fallback when no compiled or Triton kernel applies.
    """
    validate_scatter_exits_args(result_logits, result_exit, logits, order, num_continue, positions, exit_index)
    num_results = result_logits.shape[0]
    leaving = torch.arange(order.shape[0], device=order.device) >= num_continue
    rows = order
    destinations = torch.where(leaving, positions[rows], num_results)
    # One extra row receives every continuing slot's write and is discarded,
    # so result rows no leaving sample maps to keep their values.
    padded_logits = torch.cat([result_logits, result_logits.new_empty(1, result_logits.shape[1])])
    padded_exit = torch.cat([result_exit, result_exit.new_empty(1)])
    padded_logits.index_copy_(0, destinations, logits.detach()[rows])
    padded_exit.index_fill_(0, destinations, exit_index)
    result_logits.copy_(padded_logits[:num_results])
    result_exit.copy_(padded_exit[:num_results])


def _fake_scatter_exits(
    result_logits: torch.Tensor,
    result_exit: torch.Tensor,
    logits: torch.Tensor,
    order: torch.Tensor,
    num_continue: torch.Tensor,
    positions: torch.Tensor,
    exit_index: int,
) -> None:
    torch._check(logits.dim() == 2, lambda: f"expected [N, C] logits, got shape {tuple(logits.shape)}")
    torch._check(
        result_logits.dim() == 2 and result_logits.shape[1] == logits.shape[1],
        lambda: "scatter_exits expects result_logits of shape [M, C]",
    )


def _scatter_exits_triton(
    result_logits: torch.Tensor,
    result_exit: torch.Tensor,
    logits: torch.Tensor,
    order: torch.Tensor,
    num_continue: torch.Tensor,
    positions: torch.Tensor,
    exit_index: int,
) -> None:
    triton_kernels(SPEC.triton_module).scatter_exits_triton(
        result_logits, result_exit, logits, order, num_continue, positions, exit_index
    )


SPEC = OpSpec("scatter_exits", "scatter_exits", {
    FUNCTIONAL: Form(triton=_scatter_exits_triton, reference=scatter_exits_reference, fake=_fake_scatter_exits,
                     mutates_args=("result_logits", "result_exit")),
})
register(SPEC)


def scatter_exits(
    result_logits: torch.Tensor,
    result_exit: torch.Tensor,
    logits: torch.Tensor,
    order: torch.Tensor,
    num_continue: torch.Tensor,
    positions: torch.Tensor,
    exit_index: int,
    backend: str | None = None,
) -> None:
    """Writes the leaving samples' logits and exit index into the results, in place.

    Args:
        result_logits: [M, C] tensor of the logits' dtype, any strides (written).
        result_exit: [M] int64 tensor (written).
        logits: [N, C] float16/bfloat16/float32/float64 logits of the live batch.
        order, num_continue: exit_partition's outputs for these logits.
        positions: [N] int64, the original batch position of each live sample.
        exit_index: int >= 0, written to result_exit for the leaving samples.
        backend: None (automatic, or the RANET_FAST_BACKEND environment variable),
            "cuda", "triton", "cpu" or "reference"; see ranet_fast._extension.
    """
    validate_scatter_exits_args(result_logits, result_exit, logits, order, num_continue, positions, exit_index)
    run(SPEC, backend, result_logits, result_exit, logits.detach(), order, num_continue, positions, exit_index)
