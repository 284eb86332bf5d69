"""Triton kernel of exit_confidence: max softmax probability and argmax per row.

Each program handles BLOCK_ROWS rows and walks their columns in BLOCK_COLS
tiles, keeping an online (running) maximum, its first column and the sum of
exp(x - maximum) rescaled whenever the maximum grows, so any number of classes
takes one pass over memory. These per-row statistics are @triton.jit helpers
(_softmax_statistics, _row_maximum, _max_softmax_confidence) that exit_partition's
kernels call too, so that their decisions are computed by the same code.

Semantics match ranet_fast.ops.exit_confidence_reference: ties go to the lowest
column, a NaN makes the confidence NaN and the prediction the first NaN's
column, and a row whose maximum is infinite gets a NaN confidence.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .specializations import FLOATING_DTYPES, Specialization, powers_of_two

# Elements held per program: enough to hide memory latency on the GPU while
# keeping registers per thread low. 4096 spilled on sm_90 (each thread also keeps
# the running state of every row it holds); with 1024 no variant spills, though
# float64 ones use up to 254 registers (tests/test_triton_sm90_compile.py).
_ELEMENTS_PER_PROGRAM = 1024
_MAX_BLOCK_COLS = 1024


@triton.jit
def _is_finite(x):
    return (x > float("-inf")) & (x < float("inf"))


@triton.jit
def _row_tile(row_starts, row_mask, col_start, num_cols, stride_col, BLOCK_COLS: tl.constexpr,
              ACC_DTYPE: tl.constexpr):
    """Columns [col_start, col_start + BLOCK_COLS) of the rows starting at row_starts, in ACC_DTYPE.

    Returns (tile, mask, first_nan): the tile with its NaNs and masked-out entries as -inf, the
    mask, and each row's first NaN column in the tile (num_cols if none).
    """
    cols = col_start + tl.arange(0, BLOCK_COLS).to(tl.int64)
    mask = row_mask[:, None] & (cols[None, :] < num_cols)
    tile = tl.load(row_starts[:, None] + cols[None, :] * stride_col, mask=mask, other=float("-inf"))
    tile = tile.to(ACC_DTYPE)
    tile_is_nan = tile != tile
    first_nan = tl.min(tl.where(tile_is_nan, cols[None, :], num_cols), axis=1)
    # NaNs are accounted for by first_nan; drop them from the max and sum.
    return tl.where(tile_is_nan, float("-inf"), tile), mask, first_nan


@triton.jit
def _softmax_statistics(row_starts, row_mask, num_cols, stride_col, BLOCK_ROWS: tl.constexpr,
                        BLOCK_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One pass over BLOCK_ROWS rows: (maximum, sum of exp(x - maximum), argmax, first NaN column)
    of each, NaNs left out of the first three; the first NaN column is num_cols for a row without."""
    running_max = tl.full((BLOCK_ROWS,), float("-inf"), ACC_DTYPE)
    running_sum = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
    # Column of running_max; 0 is right for rows whose entries are all -inf.
    running_argmax = tl.zeros((BLOCK_ROWS,), tl.int64)
    # First NaN column, or num_cols when the row has none so far.
    first_nan = tl.zeros((BLOCK_ROWS,), tl.int64) + num_cols

    for col_start in range(0, num_cols, BLOCK_COLS):
        tile, mask, tile_first_nan = _row_tile(row_starts, row_mask, col_start, num_cols, stride_col,
                                               BLOCK_COLS, ACC_DTYPE)
        first_nan = tl.minimum(first_nan, tile_first_nan)
        tile_max = tl.max(tile, axis=1)
        tile_argmax = tl.argmax(tile, axis=1, tie_break_left=True).to(tl.int64) + col_start
        # Strictly greater: an equal maximum in a later tile keeps the earlier column.
        running_argmax = tl.where(tile_max > running_max, tile_argmax, running_argmax)
        new_max = tl.maximum(running_max, tile_max)
        # Rows whose maximum is still infinite (all -inf so far, padding rows,
        # or a +inf entry) end with a NaN confidence whatever the sum is;
        # shifting by 0 for them avoids computing inf - inf.
        shift = tl.where(_is_finite(new_max), new_max, 0.0)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
            tl.where(mask, tl.exp(tile - shift[:, None]), 0.0), axis=1
        )
        running_max = new_max
    return running_max, running_sum, running_argmax, first_nan


@triton.jit
def _row_maximum(row_starts, row_mask, num_cols, stride_col, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """_softmax_statistics' maximum and first NaN column alone (the same tiles and reductions)."""
    running_max = tl.full((BLOCK_ROWS,), float("-inf"), ACC_DTYPE)
    first_nan = tl.zeros((BLOCK_ROWS,), tl.int64) + num_cols
    for col_start in range(0, num_cols, BLOCK_COLS):
        tile, _, tile_first_nan = _row_tile(row_starts, row_mask, col_start, num_cols, stride_col,
                                            BLOCK_COLS, ACC_DTYPE)
        first_nan = tl.minimum(first_nan, tile_first_nan)
        running_max = tl.maximum(running_max, tl.max(tile, axis=1))
    return running_max, first_nan


@triton.jit
def _max_softmax_confidence(running_max, running_sum, first_nan, num_cols):
    """The largest softmax probability from _softmax_statistics' results; NaN for a row with a NaN or an
    infinite maximum."""
    valid = _is_finite(running_max) & (first_nan == num_cols)
    return tl.where(valid, 1.0 / tl.where(valid, running_sum, 1.0), float("nan"))


@triton.jit
def _exit_confidence_kernel(
    logits_ptr,
    confidence_ptr,
    prediction_ptr,
    num_rows,
    num_cols,
    stride_row,
    stride_col,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row_offsets = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_offsets < num_rows
    row_starts = logits_ptr + row_offsets * stride_row
    running_max, running_sum, running_argmax, first_nan = _softmax_statistics(
        row_starts, row_mask, num_cols, stride_col, BLOCK_ROWS, BLOCK_COLS, ACC_DTYPE)
    confidence = _max_softmax_confidence(running_max, running_sum, first_nan, num_cols)
    has_nan = first_nan < num_cols
    prediction = tl.where(has_nan, first_nan, running_argmax)
    tl.store(confidence_ptr + row_offsets, confidence.to(confidence_ptr.dtype.element_ty), mask=row_mask)
    tl.store(prediction_ptr + row_offsets, prediction, mask=row_mask)


INTERPRETED = isinstance(_exit_confidence_kernel, InterpretedFunction)


def tile(num_cols: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) for logits with num_cols classes (also the entropy kernel's).

    A function of the class count only, not of the batch size: early exit shrinks the batch at
    every exit, and a tile that followed it would compile a new kernel for each power of two.
    Padding rows of a small batch are masked and cost no memory traffic.
    """
    block_cols = min(triton.next_power_of_2(num_cols), _MAX_BLOCK_COLS)
    return max(1, _ELEMENTS_PER_PROGRAM // block_cols), block_cols


def _confidence_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def accumulation_type(logits_dtype: torch.dtype):
    return tl.float64 if logits_dtype == torch.float64 else tl.float32


# Integer arguments that can be 1: the unit column stride of contiguous logits (the usual case), or
# every count and stride of one-class logits (only with the one-column tile).
_UNIT_CASES = ((), ("stride_col",), ("num_rows", "num_cols", "stride_row", "stride_col"))


def specializations() -> list[Specialization]:
    """Every variant exit_confidence_triton compiles on CUDA (see kernels/specializations.py)."""
    tiles = sorted({tile(num_cols) for num_cols in powers_of_two(_MAX_BLOCK_COLS)})
    return [
        Specialization(
            _exit_confidence_kernel,
            dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, ACC_DTYPE=accumulation_type(dtype)),
            dict(logits_ptr=dtype, confidence_ptr=_confidence_dtype(dtype), prediction_ptr=torch.int64),
            wide=wide,
            ones=ones,
        )
        for dtype in FLOATING_DTYPES
        for block_rows, block_cols in tiles
        for wide in (False, True)
        for ones in _UNIT_CASES
        if "num_cols" not in ones or block_cols == 1
    ]


def exit_confidence_triton(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel on a validated [N, C] floating tensor (any strides).

    Returns (confidence, prediction): confidence in float32 (float64 for
    float64 logits), prediction as int64 column indices.
    """
    num_rows, num_cols = logits.shape
    confidence = torch.empty(num_rows, dtype=_confidence_dtype(logits.dtype), device=logits.device)
    prediction = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return confidence, prediction
    block_rows, block_cols = tile(num_cols)
    grid = (triton.cdiv(num_rows, block_rows),)
    _exit_confidence_kernel[grid](
        logits,
        confidence,
        prediction,
        num_rows,
        num_cols,
        logits.stride(0),
        logits.stride(1),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        ACC_DTYPE=accumulation_type(logits.dtype),
    )
    return confidence, prediction
