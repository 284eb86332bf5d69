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

exit_partition_scatter (exit_partition_scatter_triton) is exit_partition followed by
scatter_exits, without the confidence and prediction. Separately that is four or five
launches (confidence, entropy, the comparison, the partition, the scatter), each reading
from memory what the previous one wrote, and up to three reads of the logits; here it is
a fill (the threshold) and two kernels. _exit_partition_scatter_kernel computes each
row's confidence, compares it with the threshold (a float64 scalar on the device,
rounded to the confidence's dtype in the kernel as PyTorch rounds it), stores the
decision and copies each leaving row r into ``result_logits[positions[r]]`` with
``result_exit[positions[r]] = exit_index`` while the row block is still in cache; the
partition kernel then orders the decisions. No host sync. The per-row statistics are
the @triton.jit helpers the separate kernels call (exit_confidence's
_softmax_statistics, _row_maximum and _max_softmax_confidence, and
_entropy_row_confidence here), so both paths take the same decisions; for entropy the
fused kernel takes the row maximum from a first sweep (NaN where the row has a NaN, the
value the entropy kernel reads at exit_confidence's prediction) instead of the prediction.
"""


import torch
import triton
import triton.language as tl

from .exit_confidence import (_MAX_BLOCK_COLS, _UNIT_CASES, _confidence_dtype, _is_finite, _max_softmax_confidence,
                              _row_maximum, _softmax_statistics, accumulation_type, exit_confidence_triton, tile)
from .specializations import FLOATING_DTYPES, Specialization, powers_of_two

_PARTITION_BLOCK = 1024
_CRITERIA = ("max_softmax", "entropy")


@triton.jit
def _entropy_row_confidence(row_starts, row_mask, row_max, num_cols, stride_col, BLOCK_ROWS: tl.constexpr,
                            BLOCK_COLS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """1 - H / log C for BLOCK_ROWS rows given their maximum in ACC_DTYPE; NaN where it is not finite."""
    # A row whose maximum is not finite ends as NaN. Shifting it by NaN makes each of its weights NaN,
    # so it adds nothing to the sums (and no inf - inf is computed), and the shift carries the verdict
    # through the loop: a flag kept beside it spilled on sm_90 around the float64 division's call.
    shift = tl.where(_is_finite(row_max), row_max, float("nan"))

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

    finite = shift == shift
    safe_sum = tl.where(finite, sum_exp, 1.0)
    entropy = tl.log(safe_sum) - weighted_sum / safe_sum
    # log C in the accumulation type, here: a float kernel argument would arrive as float32 on a GPU
    # (the interpreter keeps Python's double), costing float64 logits 7 digits (seen on an H200).
    # C == 1: the entropy is 0 and the confidence 1.
    log_classes = tl.log(tl.maximum(num_cols, 2).to(ACC_DTYPE))
    confidence = 1.0 - tl.where(num_cols > 1, entropy / log_classes, 0.0)
    # The exact value lies in [0, 1]; rounding can step just outside it.
    confidence = tl.minimum(tl.maximum(confidence, 0.0), 1.0)
    return tl.where(finite, confidence, float("nan"))


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
    confidence = _entropy_row_confidence(row_starts, row_mask, row_max, num_cols, stride_col, BLOCK_ROWS, BLOCK_COLS,
                                         ACC_DTYPE)
    tl.store(confidence_ptr + row_offsets, confidence.to(confidence_ptr.dtype.element_ty), mask=row_mask)


# exit_index is a plain runtime value, as in scatter_exits: Triton would otherwise make the value 1
# a compile-time constant and compile a second kernel for it.
@triton.jit(do_not_specialize=["exit_index"])
def _exit_partition_scatter_kernel(
    logits_ptr,
    threshold_ptr,
    positions_ptr,
    leaves_ptr,
    result_logits_ptr,
    result_exit_ptr,
    num_rows,
    num_cols,
    stride_row,
    stride_col,
    result_stride_row,
    result_stride_col,
    result_exit_stride,
    exit_index,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    row_offsets = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = row_offsets < num_rows
    row_starts = logits_ptr + row_offsets * stride_row
    if ENTROPY:
        row_max, first_nan = _row_maximum(row_starts, row_mask, num_cols, stride_col, BLOCK_ROWS, BLOCK_COLS,
                                          ACC_DTYPE)
        # What the entropy kernel reads at exit_confidence's prediction: the first NaN where the
        # row has one, else the maximum (-inf for a row of -inf; a zero maximum may differ in its
        # sign, which changes no shifted value but the sign of a zero, and so no sum or confidence).
        row_max = tl.where(first_nan < num_cols, float("nan"), row_max)
        confidence = _entropy_row_confidence(row_starts, row_mask, row_max, num_cols, stride_col, BLOCK_ROWS,
                                             BLOCK_COLS, ACC_DTYPE)
    else:
        running_max, running_sum, _, first_nan = _softmax_statistics(row_starts, row_mask, num_cols, stride_col,
                                                                     BLOCK_ROWS, BLOCK_COLS, ACC_DTYPE)
        confidence = _max_softmax_confidence(running_max, running_sum, first_nan, num_cols)
    # Padding rows (past num_rows) read only -inf, so their confidence is NaN and they store False
    # into the padding of leaves: no row mask is needed from here on (keeping one alive across the
    # loops and the division spilled predicates on sm_90). The threshold and comparison are
    # PyTorch's ``tensor >= float``: the float64 threshold rounded to nearest in the confidence's
    # dtype (to +-inf beyond float32's range), and a NaN confidence never leaves.
    leaves = confidence >= tl.load(threshold_ptr).to(ACC_DTYPE)
    tl.store(leaves_ptr + row_offsets, leaves)

    position = tl.load(positions_ptr + row_offsets, mask=leaves, other=0)
    tl.store(result_exit_ptr + position * result_exit_stride, exit_index.to(tl.int64), mask=leaves)
    destinations = result_logits_ptr + position * result_stride_row
    for col_start in range(0, num_cols, BLOCK_COLS):
        cols = col_start + tl.arange(0, BLOCK_COLS).to(tl.int64)
        mask = leaves[:, None] & (cols[None, :] < num_cols)
        # The logits' own dtype, bits unchanged, as scatter_exits copies them.
        values = tl.load(row_starts[:, None] + cols[None, :] * stride_col, mask=mask)
        tl.store(destinations[:, None] + cols[None, :] * result_stride_col, values, mask=mask)


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


# Integer arguments of the fused kernel that can be 1 (exit_index is never specialised): none;
# the unit column stride of contiguous logits; contiguous logits and results (the usual case); the
# same for a batch of one; a contiguous one-class problem with one row (only with the one-column
# tile).
_SCATTER_UNIT_CASES = (
    (),
    ("stride_col",),
    ("stride_col", "result_stride_col", "result_exit_stride"),
    ("num_rows", "stride_col", "result_stride_col", "result_exit_stride"),
    ("num_rows", "num_cols", "stride_row", "stride_col", "result_stride_row", "result_stride_col",
     "result_exit_stride"),
)


def specializations() -> list[Specialization]:
    """Every variant exit_partition_triton and exit_partition_scatter_triton compile on CUDA besides
    exit_confidence's (see kernels/specializations.py): the entropy kernel on exit_confidence's tiles,
    the fused kernel on the same tiles for each criterion, and the partition."""
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
    fused = [
        Specialization(
            _exit_partition_scatter_kernel,
            dict(BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, ACC_DTYPE=accumulation_type(dtype),
                 ENTROPY=criterion == "entropy"),
            dict(logits_ptr=dtype, threshold_ptr=torch.float64, positions_ptr=torch.int64,
                 leaves_ptr=torch.bool, result_logits_ptr=dtype, result_exit_ptr=torch.int64),
            wide=wide,
            ones=ones,
        )
        for dtype in FLOATING_DTYPES
        for block_rows, block_cols in tiles
        for criterion in _CRITERIA
        for wide in (False, True)
        for ones in _SCATTER_UNIT_CASES
        if "num_cols" not in ones or block_cols == 1
    ]
    partition = [
        Specialization(_stable_partition_kernel, dict(BLOCK=_PARTITION_BLOCK),
                       dict(leaves_ptr=torch.bool, order_ptr=torch.int64, num_continue_ptr=torch.int64),
                       wide=wide, ones=ones)
        for wide in (False, True)
        for ones in ((), ("num_rows",))
    ]
    return entropy + fused + partition


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


def exit_partition_scatter_triton(logits: torch.Tensor, threshold: float, criterion: str, positions: torch.Tensor,
                                  exit_index: int, result_logits: torch.Tensor, result_exit: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """exit_partition_triton then scatter_exits_triton in a fill and two kernels, on validated arguments.

    Writes each leaving row r of the [N, C] logits (any strides) to ``result_logits[positions[r]]``
    and ``exit_index`` to ``result_exit[positions[r]]``, in place and through their own strides, and
    returns (order, num_continue) as exit_partition_triton does. Never synchronises with the host.
    """
    num_rows, num_cols = logits.shape
    block_rows, block_cols = tile(num_cols)
    # One decision per row of every program's block: the partition reads the first num_rows.
    leaves = torch.empty(triton.cdiv(num_rows, block_rows) * block_rows, dtype=torch.bool, device=logits.device)
    order = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    num_continue = torch.empty((), dtype=torch.int64, device=logits.device)
    if num_rows > 0:
        # The threshold in float64, rounded to the confidence's dtype in the kernel as ``tensor >= float``
        # rounds it: a Python float kernel argument would reach the GPU as float32, and torch.full in
        # float32 refuses a threshold beyond float32's range (1e39), which the comparison takes as inf.
        # An asynchronous fill, no host sync.
        threshold_tensor = torch.full((1,), threshold, dtype=torch.float64, device=logits.device)
        _exit_partition_scatter_kernel[(triton.cdiv(num_rows, block_rows),)](
            logits,
            threshold_tensor,
            positions.contiguous(),  # read only
            leaves,
            result_logits,
            result_exit,
            num_rows,
            num_cols,
            logits.stride(0),
            logits.stride(1),
            result_logits.stride(0),
            result_logits.stride(1),
            result_exit.stride(0),
            exit_index,
            BLOCK_ROWS=block_rows,
            BLOCK_COLS=block_cols,
            ACC_DTYPE=accumulation_type(logits.dtype),
            ENTROPY=criterion == "entropy",
        )
    # Launched for N == 0 too: it writes num_continue = 0.
    _stable_partition_kernel[(1,)](leaves, order, num_continue, num_rows, BLOCK=_PARTITION_BLOCK)
    return order, num_continue
