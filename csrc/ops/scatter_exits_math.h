// Per-slot indexing of scatter_exits, shared by the CPU and CUDA kernels.
//
// exit_partition's `order` holds the continuing samples in slots
// [0, num_continue) and the leaving ones in [num_continue, N). scatter_exits
// visits every slot, skips the continuing ones and copies the leaving sample
// r = order[slot] to row positions[r] of the results.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace ranet_fast::ops::scatter_exits_math {

C10_HOST_DEVICE inline bool slot_leaves(int64_t slot, int64_t num_continue) {
  return slot >= num_continue;
}

C10_HOST_DEVICE inline bool in_range(int64_t index, int64_t size) {
  return index >= 0 && index < size;
}

// Offset of element (row, column) of a strided 2-D tensor.
C10_HOST_DEVICE inline int64_t offset_2d(
    int64_t row,
    int64_t column,
    int64_t stride_row,
    int64_t stride_column) {
  return row * stride_row + column * stride_column;
}

} // namespace ranet_fast::ops::scatter_exits_math
