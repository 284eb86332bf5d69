// CPU kernel of ranet_fast::scatter_exits. The index values are checked in
// one serial pass first (N integers), so the copy itself, parallel over the
// leaving slots, never meets a bad index.
#include "../scatter_exits.h"
#include "../scatter_exits_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace ranet_fast::ops {

namespace {

namespace math = scatter_exits_math;

// Elements per parallel task (ATen's elementwise grain size).
constexpr int64_t kElementsPerTask = 32768;

void scatter_exits_write(const ScatterExitsArgs& args) {
  const auto& [result_logits, result_exit, logits, order, num_continue, positions, exit_index] = args;
  const int64_t num_rows = logits.size(0);
  const int64_t num_classes = logits.size(1);
  const int64_t num_results = result_logits.size(0);
  const int64_t first_leaving = num_continue.item<int64_t>();
  TORCH_CHECK(
      first_leaving >= 0 && first_leaving <= num_rows,
      "ranet_fast::scatter_exits: num_continue (",
      first_leaving,
      ") must lie in [0, N] with N = ",
      num_rows);
  // Inputs only: contiguous copies are fine. The results are written in
  // place through their own strides.
  const at::Tensor order_values = order.contiguous();
  const at::Tensor position_values = positions.contiguous();
  const int64_t* order_data = order_values.const_data_ptr<int64_t>();
  const int64_t* position_data = position_values.const_data_ptr<int64_t>();
  for (int64_t slot = first_leaving; slot < num_rows; ++slot) {
    const int64_t row = order_data[slot];
    TORCH_CHECK(
        math::in_range(row, num_rows),
        "ranet_fast::scatter_exits: order[",
        slot,
        "] = ",
        row,
        " is out of range for N = ",
        num_rows);
    TORCH_CHECK(
        math::in_range(position_data[row], num_results),
        "ranet_fast::scatter_exits: positions[",
        row,
        "] = ",
        position_data[row],
        " is out of range for M = ",
        num_results);
  }
  const int64_t num_leaving = num_rows - first_leaving;
  if (num_leaving == 0) {
    return;
  }
  int64_t* exit_data = result_exit.mutable_data_ptr<int64_t>();
  const int64_t exit_stride = result_exit.stride(0);
  const int64_t slots_per_task =
      std::max<int64_t>(1, kElementsPerTask / num_classes);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "scatter_exits_cpu", [&] {
        const scalar_t* source = logits.const_data_ptr<scalar_t>();
        scalar_t* destination = result_logits.mutable_data_ptr<scalar_t>();
        const int64_t source_row_stride = logits.stride(0);
        const int64_t source_column_stride = logits.stride(1);
        const int64_t destination_row_stride = result_logits.stride(0);
        const int64_t destination_column_stride = result_logits.stride(1);
        at::parallel_for(
            first_leaving, num_rows, slots_per_task, [&](int64_t begin, int64_t end) {
              for (int64_t slot = begin; slot < end; ++slot) {
                const int64_t row = order_data[slot];
                const int64_t position = position_data[row];
                for (int64_t column = 0; column < num_classes; ++column) {
                  destination[math::offset_2d(
                      position, column, destination_row_stride,
                      destination_column_stride)] =
                      source[math::offset_2d(
                          row, column, source_row_stride, source_column_stride)];
                }
                exit_data[position * exit_stride] = exit_index;
              }
            });
      });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  m.impl("scatter_exits", &scatter_exits<scatter_exits_write>);
}

} // namespace ranet_fast::ops
