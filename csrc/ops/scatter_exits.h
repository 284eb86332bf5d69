// Declarations shared by the scatter_exits schema and its kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ranet_fast::ops {

// Shapes, dtypes and devices of scatter_exits' arguments: result_logits
// [M, C] with the logits' dtype, result_exit [M] int64, logits [N, C]
// floating, order and positions [N] int64, num_continue a 0-dim int64 tensor,
// all on one device; exit_index >= 0. The Python wrapper validates first with
// friendlier messages; this guards direct torch.ops calls. Index values are
// checked by the kernels (they live on the device).
void check_scatter_exits_input(
    const at::Tensor& result_logits,
    const at::Tensor& result_exit,
    const at::Tensor& logits,
    const at::Tensor& order,
    const at::Tensor& num_continue,
    const at::Tensor& positions,
    int64_t exit_index);

} // namespace ranet_fast::ops
