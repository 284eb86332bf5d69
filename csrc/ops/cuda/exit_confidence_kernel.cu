// CUDA kernel of ranet_fast::exit_confidence: one warp per row. Each lane folds
// a strided slice of the row's columns, then the 32 partial states are merged
// with warp shuffles. Classifier heads have 10 to 1000 classes, so a warp per
// row keeps every lane busy for the large cases without shared memory.
#include "../exit_confidence.h"
#include "../exit_confidence_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

namespace ranet_fast::ops {

namespace {

namespace math = exit_confidence_math;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullWarpMask = 0xffffffffu;

template <typename acc_t>
__device__ math::RowState<acc_t> shuffle_down(
    const math::RowState<acc_t>& state,
    int offset) {
  math::RowState<acc_t> other;
  other.max_value = __shfl_down_sync(kFullWarpMask, state.max_value, offset);
  other.sum_exp = __shfl_down_sync(kFullWarpMask, state.sum_exp, offset);
  other.index = __shfl_down_sync(
      kFullWarpMask, static_cast<long long>(state.index), offset);
  return other;
}

template <typename scalar_t, typename acc_t>
__global__ void exit_confidence_warp_per_row_kernel(
    const scalar_t* __restrict__ logits,
    int64_t num_rows,
    int64_t num_classes,
    acc_t* __restrict__ confidence,
    int64_t* __restrict__ prediction) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock +
      threadIdx.x / kWarpSize;
  // The whole warp shares `row`, so it leaves together and the full-mask
  // shuffles below only ever run with all 32 lanes present.
  if (row >= num_rows) {
    return;
  }
  const scalar_t* row_logits = logits + row * num_classes;
  math::RowState<acc_t> state = math::empty_state<acc_t>();
  for (int64_t column = lane; column < num_classes; column += kWarpSize) {
    math::update(state, static_cast<acc_t>(row_logits[column]), column);
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    state = math::combine(state, shuffle_down(state, offset));
  }
  if (lane == 0) {
    confidence[row] = math::confidence(state);
    prediction[row] = state.index;
  }
}

std::tuple<at::Tensor, at::Tensor> exit_confidence_cuda(const at::Tensor& logits) {
  check_exit_confidence_input(logits);
  TORCH_CHECK(
      logits.device().is_cuda(),
      "exit_confidence_cuda got a tensor on ",
      logits.device());
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const at::Tensor input = logits.contiguous();
  const int64_t num_rows = input.size(0);
  const int64_t num_classes = input.size(1);
  at::Tensor confidence = at::empty(
      {num_rows},
      input.options().dtype(exit_confidence_output_dtype(input.scalar_type())));
  at::Tensor prediction = at::empty({num_rows}, input.options().dtype(at::kLong));
  if (num_rows == 0) {
    return {confidence, prediction};
  }
  const int64_t num_blocks = (num_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(
      num_blocks <= std::numeric_limits<int>::max(),
      "exit_confidence_cuda: too many rows (",
      num_rows,
      ")");
  // c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
  // forwards to; ATen/cuda/CUDAContext.h would also pull in cuBLAS/cuSPARSE
  // headers that a minimal CUDA toolkit lacks.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "exit_confidence_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        exit_confidence_warp_per_row_kernel<scalar_t, acc_t>
            <<<static_cast<unsigned>(num_blocks),
               kWarpsPerBlock * kWarpSize,
               0,
               stream>>>(
                input.const_data_ptr<scalar_t>(),
                num_rows,
                num_classes,
                confidence.mutable_data_ptr<acc_t>(),
                prediction.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {confidence, prediction};
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CUDA, m) {
  m.impl("exit_confidence", &exit_confidence_cuda);
}

} // namespace ranet_fast::ops
