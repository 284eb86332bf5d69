"""Triton kernel of gather_rows: the selected rows of every tensor in one launch.

out_i[r] = t_i[index[r]] for all tensors t_i, copied as raw bytes. The inputs
must be row-dense (each row one dense block, any batch stride) and the
outputs packed (batch stride = row size), which ranet_fast/ops/gather_rows.py
arranges.

The tensors are described by a table (an int64 tensor, one row of _FIELDS
values per tensor: base addresses, strides and the work plan), copied to the
device once per call, so any number of tensors takes one launch. The kernel
loads a tensor's base addresses from the table and casts them to pointers
(``.to(tl.pointer_type(...), bitcast=True)``, an int-to-pointer cast that the
compiler and the Triton interpreter both support).

Work is cut exactly as in csrc/ops/gather_rows_math.h: each tensor's rows are
copied in units of unit_bytes (8, 4, 2 or 1 bytes: the widest that divides
every address and length of the tensor; Triton's own vectorisation cannot see
the alignment of a pointer loaded from memory, so units stop at 8 bytes
here), and cut into items of at most UNITS_PER_ITEM units: long rows into
chunks, short rows grouped several to an item. One program copies one item;
programs find their tensor by binary search over the table's first items.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .specializations import Specialization

# Units per program (a power of two: the block of tl.arange).
UNITS_PER_ITEM = 1024
# Columns of the descriptor table (one row per tensor, see build_table).
_SRC = tl.constexpr(0)  # source base address
_DST = tl.constexpr(1)  # destination base address
_SRC_STRIDE_UNITS = tl.constexpr(2)  # source row stride, in units
_UNITS_PER_ROW = tl.constexpr(3)
_ROWS_PER_ITEM = tl.constexpr(4)
_CHUNKS_PER_ROW = tl.constexpr(5)
_FIRST_ITEM = tl.constexpr(6)  # prefix sum of the items of the tensors before
_UNIT_BYTES = tl.constexpr(7)
_FIELDS = 8


@triton.jit
def _copy_item(src_address, dst_address, index_ptr, src_stride_units, units_per_row,
               row_begin, row_end, unit_begin, unit_end, UNIT: tl.constexpr, BLOCK: tl.constexpr):
    """Copies units [unit_begin, unit_end) of output rows [row_begin, row_end), UNIT-typed."""
    src = src_address.to(tl.pointer_type(UNIT), bitcast=True)
    dst = dst_address.to(tl.pointer_type(UNIT), bitcast=True)
    width = unit_end - unit_begin
    offsets = tl.arange(0, BLOCK)
    local_row = offsets // width
    row = row_begin + local_row
    unit = unit_begin + (offsets - local_row * width)
    mask = row < row_end
    source_row = tl.load(index_ptr + row, mask=mask, other=0)
    values = tl.load(src + source_row * src_stride_units + unit, mask=mask)
    tl.store(dst + row * units_per_row + unit, values, mask=mask)


@triton.jit
def _gather_rows_kernel(table_ptr, index_ptr, num_tensors, rows_out,
                        FIELDS: tl.constexpr, BLOCK: tl.constexpr):
    item = tl.program_id(0).to(tl.int64)
    # The last tensor whose first item is <= item (first items are prefix sums, the first is 0).
    low = tl.full((), 0, tl.int32)
    high = low + num_tensors
    while high - low > 1:
        middle = (low + high) // 2
        below = tl.load(table_ptr + middle * FIELDS + _FIRST_ITEM) <= item
        low = tl.where(below, middle, low)
        high = tl.where(below, high, middle)
    entry = table_ptr + low * FIELDS
    src_address = tl.load(entry + _SRC)
    dst_address = tl.load(entry + _DST)
    src_stride_units = tl.load(entry + _SRC_STRIDE_UNITS)
    units_per_row = tl.load(entry + _UNITS_PER_ROW)
    rows_per_item = tl.load(entry + _ROWS_PER_ITEM)
    chunks_per_row = tl.load(entry + _CHUNKS_PER_ROW)
    local_item = item - tl.load(entry + _FIRST_ITEM)
    unit_bytes = tl.load(entry + _UNIT_BYTES)
    row_group = local_item // chunks_per_row
    chunk = local_item - row_group * chunks_per_row
    row_begin = row_group * rows_per_item
    row_end = tl.minimum(row_begin + rows_per_item, rows_out)
    unit_begin = chunk * BLOCK
    unit_end = tl.minimum(unit_begin + BLOCK, units_per_row)
    if unit_bytes == 8:
        _copy_item(src_address, dst_address, index_ptr, src_stride_units, units_per_row,
                   row_begin, row_end, unit_begin, unit_end, tl.int64, BLOCK)
    elif unit_bytes == 4:
        _copy_item(src_address, dst_address, index_ptr, src_stride_units, units_per_row,
                   row_begin, row_end, unit_begin, unit_end, tl.int32, BLOCK)
    elif unit_bytes == 2:
        _copy_item(src_address, dst_address, index_ptr, src_stride_units, units_per_row,
                   row_begin, row_end, unit_begin, unit_end, tl.int16, BLOCK)
    else:
        _copy_item(src_address, dst_address, index_ptr, src_stride_units, units_per_row,
                   row_begin, row_end, unit_begin, unit_end, tl.int8, BLOCK)


INTERPRETED = isinstance(_gather_rows_kernel, InterpretedFunction)


def specializations() -> list[Specialization]:
    """Every variant gather_rows_triton compiles on CUDA (see kernels/specializations.py): one
    kernel for all dtypes and copy widths (the width is read from the table at run time)."""
    return [
        # num_tensors counts the table's rows: always a 32-bit value.
        Specialization(_gather_rows_kernel, dict(FIELDS=_FIELDS, BLOCK=UNITS_PER_ITEM),
                       dict(table_ptr=torch.int64, index_ptr=torch.int64), wide=wide, narrow=("num_tensors",),
                       ones=ones)
        for wide in (False, True)
        # One tensor, or one output row: Triton passes arguments equal to 1 as constants.
        for ones in ((), ("num_tensors",), ("rows_out",), ("num_tensors", "rows_out"))
    ]


def copy_unit_bytes(src_address: int, dst_address: int, row_bytes: int, src_stride_bytes: int) -> int:
    """Widest unit in {8, 4, 2, 1} bytes dividing every address and length (gather_rows_math.h, capped at 8)."""
    combined = src_address | dst_address | row_bytes | src_stride_bytes
    unit = 8
    while unit > 1 and combined % unit:
        unit //= 2
    return unit


def plan_rows(row_bytes: int, unit_bytes: int, rows: int, units_per_item: int) -> tuple[int, int, int, int]:
    """(units_per_row, rows_per_item, chunks_per_row, num_items): plan_rows of gather_rows_math.h."""
    units_per_row = row_bytes // unit_bytes
    if rows == 0 or units_per_row == 0:
        return units_per_row, 1, 1, 0
    if units_per_row > units_per_item:
        rows_per_item, chunks_per_row = 1, -(-units_per_row // units_per_item)
    else:
        rows_per_item, chunks_per_row = units_per_item // units_per_row, 1
    return units_per_row, rows_per_item, chunks_per_row, -(-rows // rows_per_item) * chunks_per_row


def build_table(outputs: list[torch.Tensor], sources: list[torch.Tensor]) -> tuple[list[list[int]], int]:
    """Rows of the descriptor table of the tensors that have anything to copy, and the total item count."""
    table, num_items = [], 0
    for out, source in zip(outputs, sources):
        rows_out = out.shape[0]
        row_bytes = math.prod(out.shape[1:]) * out.element_size()
        src_stride_bytes = source.stride(0) * source.element_size()
        unit_bytes = copy_unit_bytes(source.data_ptr(), out.data_ptr(), row_bytes, src_stride_bytes)
        units_per_row, rows_per_item, chunks_per_row, items = plan_rows(row_bytes, unit_bytes, rows_out, UNITS_PER_ITEM)
        if items == 0:
            continue
        # In the order of the _SRC ... _UNIT_BYTES columns.
        table.append([source.data_ptr(), out.data_ptr(), src_stride_bytes // unit_bytes, units_per_row,
                      rows_per_item, chunks_per_row, num_items, unit_bytes])
        num_items += items
    return table, num_items


def gather_rows_triton(outputs: list[torch.Tensor], sources: list[torch.Tensor], index: torch.Tensor) -> None:
    """Writes sources[i][index] into outputs[i] for every i in one launch.

    sources: row-dense tensors with the same size(0); outputs: packed
    [len(index), *source.shape[1:]] tensors of the same dtypes (see
    ranet_fast.ops.gather_rows.allocate_outputs); index: 1-D int64, values in
    range (not checked here). All on one device.
    """
    if len(outputs) != len(sources):
        raise ValueError(f"gather_rows_triton got {len(outputs)} outputs for {len(sources)} sources")
    table, num_items = build_table(outputs, sources)
    if num_items == 0:
        return
    descriptors = torch.tensor(table, dtype=torch.int64)
    if index.device.type == "cuda":
        # Pinned, so the copy is asynchronous; torch keeps the host buffer alive until it is done.
        descriptors = descriptors.pin_memory().to(index.device, non_blocking=True)
    index = index.contiguous()
    # The table holds raw addresses on index's device, so launch there.
    on_device = torch.cuda.device(index.device) if index.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _gather_rows_kernel[(num_items,)](descriptors, index, len(table), index.shape[0],
                                          FIELDS=_FIELDS, BLOCK=UNITS_PER_ITEM)
