"""Triton kernel of scatter_exits: copy the leaving samples' rows into the results.

Program (slot, column block) handles one slot of ``order`` and BLOCK_COLS
classes. num_continue is read on the device, so the grid covers all N slots and
programs of continuing slots store nothing. Both results are written through
their own strides.
"""

import torch
import triton
import triton.language as tl

from .specializations import FLOATING_DTYPES, Specialization, powers_of_two

_MAX_BLOCK_COLS = 1024


# exit_index is a plain runtime value: Triton would otherwise make the value 1
# a compile-time constant and compile a second kernel for it.
@triton.jit(do_not_specialize=["exit_index"])
def _scatter_exits_kernel(
    result_logits_ptr,
    result_stride_row,
    result_stride_col,
    result_exit_ptr,
    result_exit_stride,
    logits_ptr,
    logits_stride_row,
    logits_stride_col,
    order_ptr,
    num_continue_ptr,
    positions_ptr,
    num_cols,
    exit_index,
    BLOCK_COLS: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    column_block = tl.program_id(1)
    leaving = slot >= tl.load(num_continue_ptr)
    row = tl.load(order_ptr + slot)
    position = tl.load(positions_ptr + row, mask=leaving, other=0)
    cols = column_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS).to(tl.int64)
    mask = leaving & (cols < num_cols)
    values = tl.load(logits_ptr + row * logits_stride_row + cols * logits_stride_col, mask=mask)
    tl.store(result_logits_ptr + position * result_stride_row + cols * result_stride_col, values, mask=mask)
    tl.store(result_exit_ptr + position * result_exit_stride, exit_index.to(tl.int64), mask=leaving & (column_block == 0))


def _block_cols(num_cols: int) -> int:
    return min(triton.next_power_of_2(num_cols), _MAX_BLOCK_COLS)


def specializations() -> list[Specialization]:
    """Every variant scatter_exits_triton compiles on CUDA (see kernels/specializations.py)."""
    # Integer arguments that can be 1 (exit_index is never specialised): unit column strides of
    # contiguous logits and results, or every size and stride of a one-class problem.
    unit_cases = ((), ("result_stride_col", "logits_stride_col"),
                  ("result_stride_row", "result_stride_col", "result_exit_stride", "logits_stride_row",
                   "logits_stride_col", "num_cols"))
    return [
        Specialization(
            _scatter_exits_kernel,
            dict(BLOCK_COLS=block_cols),
            dict(result_logits_ptr=dtype, result_exit_ptr=torch.int64, logits_ptr=dtype, order_ptr=torch.int64,
                 num_continue_ptr=torch.int64, positions_ptr=torch.int64),
            wide=wide,
            ones=ones,
        )
        for dtype in FLOATING_DTYPES
        for block_cols in sorted({_block_cols(num_cols) for num_cols in powers_of_two(_MAX_BLOCK_COLS)})
        for wide in (False, True)
        for ones in unit_cases
        if "num_cols" not in ones or block_cols == 1
    ]


def scatter_exits_triton(
    result_logits: torch.Tensor,
    result_exit: torch.Tensor,
    logits: torch.Tensor,
    order: torch.Tensor,
    num_continue: torch.Tensor,
    positions: torch.Tensor,
    exit_index: int,
) -> None:
    """Launches the kernel on validated arguments (see ranet_fast.ops.scatter_exits)."""
    num_rows, num_cols = logits.shape
    if num_rows == 0:
        return
    # Read-only index inputs may be copied; the results are written in place.
    order = order.contiguous()
    positions = positions.contiguous()
    block_cols = _block_cols(num_cols)
    _scatter_exits_kernel[(num_rows, triton.cdiv(num_cols, block_cols))](
        result_logits,
        result_logits.stride(0),
        result_logits.stride(1),
        result_exit,
        result_exit.stride(0),
        logits,
        logits.stride(0),
        logits.stride(1),
        order,
        num_continue,
        positions,
        num_cols,
        exit_index,
        BLOCK_COLS=block_cols,
    )
