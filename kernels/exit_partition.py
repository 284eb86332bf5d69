"""Triton kernels of exit_partition: confidence per row and a stable partition.

* "max_softmax": confidence and prediction are exit_confidence's Triton kernel.
* "entropy": the prediction (argmax) also comes from exit_confidence's kernel;
  a second kernel reads each row's maximum through it and sums, in tiles,
  ``S = sum exp(x - max)`` and ``T = sum exp(x - max) * (x - max)`` to get
  ``H = log S - T / S`` and the confidence ``1 - H / log C``. A row whose
  maximum is not finite (its argmax lands on a NaN, +inf or -inf) gets NaN.
* The leave decision ``confidence >= threshold`` is PyTorch's own comparison,
  which rounds the threshold to the confidence's dtype exactly as the
  reference does (a Triton float argument would always be float32).
* The partition is one program looping over chunks of the N decisions: a first
  sweep counts the continuing samples, a second one places each sample with
  tl.cumsum and a count carried across chunks. N is a batch size, so one
  program suffices, and num_continue is written on the device.
"""


import torch
import triton
import triton.language as tl

from .exit_confidence import (_MAX_BLOCK_COLS, _UNIT_CASES, _confidence_dtype, accumulation_type,
                              exit_confidence_triton, tile)
from .specializations import FLOATING_DTYPES, Specialization, powers_of_two

_PARTITION_BLOCK = 1024


@triton.jit
def _entropy_confidence_kernel(
    logits_ptr,
    prediction_ptr,
    confidence_ptr,
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
    argmax = tl.load(prediction_ptr + row_offsets, mask=row_mask, other=0)
    row_max = tl.load(row_starts + argmax * stride_col, mask=row_mask, other=0.0).to(ACC_DTYPE)
    finite = (row_max > float("-inf")) & (row_max < float("inf"))
    # Non-finite rows end as NaN whatever the sums are; shifting them by 0
    # keeps the arithmetic below free of inf - inf.
    shift = tl.where(finite, row_max, 0.0)

    sum_exp = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
    weighted_sum = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
    for col_start in range(0, num_cols, BLOCK_COLS):
        cols = col_start + tl.arange(0, BLOCK_COLS).to(tl.int64)
        mask = row_mask[:, None] & (cols[None, :] < num_cols)
        tile = tl.load(row_starts[:, None] + cols[None, :] * stride_col, mask=mask, other=float("-inf"))
        shifted = tile.to(ACC_DTYPE) - shift[:, None]
        weight = tl.exp(shifted)
        # 0 log 0 = 0: a zero weight (a -inf logit, padding, underflow) adds
        # nothing, instead of 0 * -inf = NaN.
        contributes = weight > 0.0
        sum_exp += tl.sum(tl.where(contributes, weight, 0.0), axis=1)
        weighted_sum += tl.sum(tl.where(contributes, weight * shifted, 0.0), axis=1)

    safe_sum = tl.where(finite, sum_exp, 1.0)
    entropy = tl.log(safe_sum) - weighted_sum / safe_sum
    # log C in the accumulation type, here: a float kernel argument would arrive as float32 on a GPU
    # (the interpreter keeps Python's double), costing float64 logits 7 digits (seen on an H200).
    # C == 1: the entropy is 0 and the confidence 1.
    log_classes = tl.log(tl.maximum(num_cols, 2).to(ACC_DTYPE))
    confidence = 1.0 - tl.where(num_cols > 1, entropy / log_classes, 0.0)
    # The exact value lies in [0, 1]; rounding can step just outside it.
    confidence = tl.minimum(tl.maximum(confidence, 0.0), 1.0)
    confidence = tl.where(finite, confidence, float("nan"))
    tl.store(confidence_ptr + row_offsets, confidence.to(confidence_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _stable_partition_kernel(leaves_ptr, order_ptr, num_continue_ptr, num_rows, BLOCK: tl.constexpr):
    num_continue = tl.full((), 0, tl.int64)
    for start in range(0, num_rows, BLOCK):
        indices = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = indices < num_rows
        leaves = tl.load(leaves_ptr + indices, mask=mask, other=1) != 0
        num_continue += tl.sum(tl.where(leaves, 0, 1).to(tl.int64), axis=0)

    continuing_before_chunk = tl.full((), 0, tl.int64)
    for start in range(0, num_rows, BLOCK):
        indices = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = indices < num_rows
        leaves = tl.load(leaves_ptr + indices, mask=mask, other=1) != 0
        continues = tl.where(leaves, 0, 1).to(tl.int64)
        continuing_before = continuing_before_chunk + tl.cumsum(continues, axis=0) - continues
        destination = tl.where(leaves, num_continue + (indices - continuing_before), continuing_before)
        tl.store(order_ptr + destination, indices, mask=mask)
        continuing_before_chunk += tl.sum(continues, axis=0)
    tl.store(num_continue_ptr, num_continue)


def _entropy_confidence(logits: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    num_rows, num_cols = logits.shape
    is_double = logits.dtype == torch.float64
    confidence = torch.empty(num_rows, dtype=torch.float64 if is_double else torch.float32, device=logits.device)
    if num_rows == 0:
        return confidence
    block_rows, block_cols = tile(num_cols)
    _entropy_confidence_kernel[(triton.cdiv(num_rows, block_rows),)](
        logits,
        prediction,
        confidence,
        num_rows,
        num_cols,
        logits.stride(0),
        logits.stride(1),
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        ACC_DTYPE=accumulation_type(logits.dtype),
    )
    return confidence


def specializations() -> list[Specialization]:
    """Every variant exit_partition_triton compiles on CUDA besides exit_confidence's (see
    kernels/specializations.py): the entropy kernel on exit_confidence's tiles, and the partition."""
    tiles = sorted({tile(num_cols) for num_cols in powers_of_two(_MAX_BLOCK_COLS)})
    entropy = [
        Specialization(
            _entropy_confidence_kernel,
            dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, ACC_DTYPE=accumulation_type(dtype)),
            dict(logits_ptr=dtype, prediction_ptr=torch.int64, confidence_ptr=_confidence_dtype(dtype)),
            wide=wide,
            ones=ones,
        )
        for dtype in FLOATING_DTYPES
        for block_rows, block_cols in tiles
        for wide in (False, True)
        for ones in _UNIT_CASES  # exit_confidence's: the entropy kernel takes the same arguments
        if "num_cols" not in ones or block_cols == 1
    ]
    partition = [
        Specialization(_stable_partition_kernel, dict(BLOCK=_PARTITION_BLOCK),
                       dict(leaves_ptr=torch.bool, order_ptr=torch.int64, num_continue_ptr=torch.int64),
                       wide=wide, ones=ones)
        for wide in (False, True)
        for ones in ((), ("num_rows",))
    ]
    return entropy + partition


def exit_partition_triton(
    logits: torch.Tensor, threshold: float, criterion: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the kernels on validated [N, C] floating logits (any strides)."""
    confidence, prediction = exit_confidence_triton(logits)
    if criterion == "entropy":
        confidence = _entropy_confidence(logits, prediction)
    leaves = confidence >= threshold
    num_rows = logits.shape[0]
    order = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    num_continue = torch.empty((), dtype=torch.int64, device=logits.device)
    # Launched for N == 0 too: it writes num_continue = 0.
    _stable_partition_kernel[(1,)](leaves, order, num_continue, num_rows, BLOCK=_PARTITION_BLOCK)
    return confidence, prediction, order, num_continue
