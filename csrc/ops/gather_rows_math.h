// Work decomposition and indexing of gather_rows, shared by the CPU and CUDA
// kernels (and mirrored by kernels/gather_rows.py for Triton).
//
// gather_rows copies, for every tensor t and every output row r < n, the
// row_bytes bytes of input row index[r] (at src + index[r] * src_stride_bytes)
// to output row r (at dst + r * row_bytes). Rows are copied in "units" of
// unit_bytes (16, 8, 4, 2 or 1: the widest that every address and length of
// the tensor is a multiple of, see copy_unit_bytes), so the CUDA kernel can use
// 16-byte loads and stores when the tensor allows it.
//
// The units of all tensors are cut into work items of at most kUnitsPerItem
// units each: one CUDA block, or one CPU task element, per item.
//  - A row of more units than that is split into chunks_per_row chunks (one
//    item each).
//  - Shorter rows are grouped, rows_per_item rows to an item, so that tiny
//    rows (a positions vector: 8 bytes) do not each cost a block.
// Items of one tensor are numbered row group first, chunk second, and the
// tensors' items follow one another (first_item is the prefix sum); an item
// maps back to its tensor with find_tensor and to its rows and units with
// item_extent. Since an item never holds more than kUnitsPerItem units, the
// per-unit row/unit split inside it needs only 32-bit arithmetic.
//
// C10_HOST_DEVICE expands to `__host__ __device__` under nvcc and to nothing
// in a host-only (CppExtension) build.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace ranet_fast::ops::gather_rows_math {

// Units per work item: 256 CUDA threads x 4 units each (16 KiB at 16 bytes).
constexpr int64_t kUnitsPerItem = 1024;

// How one tensor's rows are cut into work items.
struct RowPlan {
  int64_t unit_bytes;
  int64_t units_per_row;
  int64_t rows_per_item;
  int64_t chunks_per_row;
  int64_t num_items;
};

// The widest unit in {16, 8, 4, 2, 1} bytes that divides the source and
// destination addresses, the row length and the source row stride, so that
// every unit of every row is naturally aligned on both sides.
C10_HOST_DEVICE inline int64_t copy_unit_bytes(
    uint64_t src_address,
    uint64_t dst_address,
    int64_t row_bytes,
    int64_t src_stride_bytes) {
  const uint64_t combined = src_address | dst_address | static_cast<uint64_t>(row_bytes) |
      static_cast<uint64_t>(src_stride_bytes);
  int64_t unit = 16;
  while (unit > 1 && (combined & static_cast<uint64_t>(unit - 1)) != 0) {
    unit /= 2;
  }
  return unit;
}

// Cuts `rows` output rows of row_bytes bytes (a multiple of unit_bytes) into
// items of at most units_per_item units. Zero rows or empty rows give no item.
C10_HOST_DEVICE inline RowPlan plan_rows(
    int64_t row_bytes,
    int64_t unit_bytes,
    int64_t rows,
    int64_t units_per_item) {
  RowPlan plan{unit_bytes, row_bytes / unit_bytes, 1, 1, 0};
  if (rows == 0 || plan.units_per_row == 0) {
    return plan;
  }
  if (plan.units_per_row > units_per_item) {
    plan.chunks_per_row = (plan.units_per_row + units_per_item - 1) / units_per_item;
  } else {
    plan.rows_per_item = units_per_item / plan.units_per_row;
  }
  const int64_t row_groups = (rows + plan.rows_per_item - 1) / plan.rows_per_item;
  plan.num_items = row_groups * plan.chunks_per_row;
  return plan;
}

// Rows [row_begin, row_end) and units [unit_begin, unit_end) of each of those
// rows that item `local_item` (numbered within its tensor) copies.
struct ItemExtent {
  int64_t row_begin;
  int64_t row_end;
  int64_t unit_begin;
  int64_t unit_end;
};

C10_HOST_DEVICE inline ItemExtent item_extent(
    const RowPlan& plan,
    int64_t local_item,
    int64_t rows,
    int64_t units_per_item) {
  const int64_t row_group = local_item / plan.chunks_per_row;
  const int64_t chunk = local_item - row_group * plan.chunks_per_row;
  ItemExtent extent;
  extent.row_begin = row_group * plan.rows_per_item;
  extent.row_end = extent.row_begin + plan.rows_per_item < rows ? extent.row_begin + plan.rows_per_item : rows;
  extent.unit_begin = chunk * units_per_item;
  extent.unit_end = extent.unit_begin + units_per_item < plan.units_per_row
      ? extent.unit_begin + units_per_item
      : plan.units_per_row;
  return extent;
}

// The tensor whose items contain `item`: the last i < count with
// descriptors[i].first_item <= item, by binary search over the prefix sums.
// descriptors[0].first_item must be 0 and item below the total.
template <typename Descriptor>
C10_HOST_DEVICE inline int find_tensor(const Descriptor* descriptors, int count, int64_t item) {
  int low = 0;
  int high = count;
  while (high - low > 1) {
    const int middle = (low + high) / 2;
    if (descriptors[middle].first_item <= item) {
      low = middle;
    } else {
      high = middle;
    }
  }
  return low;
}

// Whether a gather index addresses one of the `rows` input rows.
C10_HOST_DEVICE inline bool index_in_range(int64_t value, int64_t rows) {
  return value >= 0 && value < rows;
}

// Byte offset of unit `unit` of input row `index_value`.
C10_HOST_DEVICE inline int64_t source_offset(
    int64_t index_value,
    int64_t src_stride_bytes,
    int64_t unit,
    int64_t unit_bytes) {
  return index_value * src_stride_bytes + unit * unit_bytes;
}

// Byte offset of unit `unit` of output row `row` (rows are packed).
C10_HOST_DEVICE inline int64_t destination_offset(int64_t row, int64_t row_bytes, int64_t unit, int64_t unit_bytes) {
  return row * row_bytes + unit * unit_bytes;
}

} // namespace ranet_fast::ops::gather_rows_math
