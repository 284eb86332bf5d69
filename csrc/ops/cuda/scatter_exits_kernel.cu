// CUDA kernel of ranet_fast::scatter_exits: one warp per slot of `order`,
// lanes striding over the classes. num_continue stays on the device, so the
// grid covers all N slots and warps of continuing slots (slot < num_continue)
// return at once. Index values cannot be checked on the host without a sync;
// out-of-range ones trip a device assertion instead of writing stray memory.
#include "../scatter_exits.h"
#include "../scatter_exits_math.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

namespace ranet_fast::ops {

namespace {

namespace math = scatter_exits_math;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;

template <typename scalar_t>
__global__ void scatter_exits_warp_per_slot_kernel(
    scalar_t* __restrict__ result_logits,
    int64_t result_row_stride,
    int64_t result_column_stride,
    int64_t* __restrict__ result_exit,
    int64_t result_exit_stride,
    int64_t num_results,
    const scalar_t* __restrict__ logits,
    int64_t logits_row_stride,
    int64_t logits_column_stride,
    int64_t num_rows,
    int64_t num_classes,
    const int64_t* __restrict__ order,
    const int64_t* __restrict__ num_continue,
    const int64_t* __restrict__ positions,
    int64_t exit_index) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock +
      threadIdx.x / kWarpSize;
  if (slot >= num_rows) {
    return;
  }
  const int64_t first_leaving = *num_continue;
  CUDA_KERNEL_ASSERT(first_leaving >= 0 && first_leaving <= num_rows);
  if (!math::slot_leaves(slot, first_leaving)) {
    return;
  }
  const int64_t row = order[slot];
  CUDA_KERNEL_ASSERT(math::in_range(row, num_rows));
  const int64_t position = positions[row];
  CUDA_KERNEL_ASSERT(math::in_range(position, num_results));
  for (int64_t column = lane; column < num_classes; column += kWarpSize) {
    result_logits[math::offset_2d(
        position, column, result_row_stride, result_column_stride)] =
        logits[math::offset_2d(row, column, logits_row_stride, logits_column_stride)];
  }
  if (lane == 0) {
    result_exit[position * result_exit_stride] = exit_index;
  }
}

void scatter_exits_write(const ScatterExitsArgs& args) {
  const auto& [result_logits, result_exit, logits, order, num_continue, positions, exit_index] = args;
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t num_rows = logits.size(0);
  if (num_rows == 0) {
    return;
  }
  const int64_t num_blocks = (num_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(
      num_blocks <= std::numeric_limits<int>::max(),
      "scatter_exits_cuda: too many rows (",
      num_rows,
      ")");
  // Read-only index inputs may be copied; the results are written in place
  // through their own strides.
  const at::Tensor order_values = order.contiguous();
  const at::Tensor position_values = positions.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "scatter_exits_cuda", [&] {
        scatter_exits_warp_per_slot_kernel<scalar_t>
            <<<static_cast<unsigned>(num_blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
                result_logits.mutable_data_ptr<scalar_t>(),
                result_logits.stride(0),
                result_logits.stride(1),
                result_exit.mutable_data_ptr<int64_t>(),
                result_exit.stride(0),
                result_logits.size(0),
                logits.const_data_ptr<scalar_t>(),
                logits.stride(0),
                logits.stride(1),
                num_rows,
                logits.size(1),
                order_values.const_data_ptr<int64_t>(),
                num_continue.const_data_ptr<int64_t>(),
                position_values.const_data_ptr<int64_t>(),
                exit_index);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CUDA, m) {
  m.impl("scatter_exits", &scatter_exits<scatter_exits_write>);
}

} // namespace ranet_fast::ops
