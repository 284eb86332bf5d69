// Declarations shared by the scatter_exits schema and its kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ranet_fast::ops {

// The arguments of one scatter_exits call, as the schema names them.
struct ScatterExitsArgs {
  const at::Tensor& result_logits;
  const at::Tensor& result_exit;
  const at::Tensor& logits;
  const at::Tensor& order;
  const at::Tensor& num_continue;
  const at::Tensor& positions;
  int64_t exit_index;
};

// Shapes, dtypes and devices of scatter_exits' arguments: result_logits
// [M, C] with the logits' dtype, result_exit [M] int64, logits [N, C]
// floating, order and positions [N] int64, num_continue a 0-dim int64 tensor,
// all on one device; exit_index >= 0. The Python wrapper validates first with
// friendlier messages; this guards direct torch.ops calls. Index values are
// checked by the kernels (they live on the device).
void check_scatter_exits_input(const ScatterExitsArgs& args);

// The checks of an op that writes leaving rows of checked [N, C] logits into
// the results: result_logits [M, C] of the logits' dtype, result_exit [M]
// int64, positions [N] int64, exit_index >= 0, all on the logits' device, the
// results without overlapping elements. Shared by scatter_exits and
// exit_partition_scatter; `op_name` prefixes the messages.
void check_result_writes(
    const char* op_name, const at::Tensor& logits, const at::Tensor& positions, int64_t exit_index,
    const at::Tensor& result_logits, const at::Tensor& result_exit);

// A device's kernel on checked arguments: checks the index values, then
// writes the leaving rows' logits and the exit index into the results.
using ScatterExitsWrite = void (*)(const ScatterExitsArgs& args);

// ranet_fast::scatter_exits on one device.
template <ScatterExitsWrite write>
void scatter_exits(
    const at::Tensor& result_logits, const at::Tensor& result_exit,
    const at::Tensor& logits, const at::Tensor& order, const at::Tensor& num_continue, const at::Tensor& positions,
    int64_t exit_index) {
  const ScatterExitsArgs args{result_logits, result_exit, logits, order, num_continue, positions, exit_index};
  check_scatter_exits_input(args);
  write(args);
}

} // namespace ranet_fast::ops
