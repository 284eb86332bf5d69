// CUDA kernels of ranet_fast::exit_partition, two launches on one stream, and
// of ranet_fast::exit_confidence, the first launch alone (max_softmax):
//
// 1. confidences: one warp per row. Each lane
//    folds a strided slice of the row's columns into a PartitionState and the
//    32 partial states are merged with warp shuffles.
// 2. stable partition: one block. N is a batch size (up to tens of
//    thousands), so a single block looping over chunks of kThreads rows
//    costs a few microseconds and needs no inter-block coordination. A first
//    sweep counts the continuing rows (the leaving rows start after them); a
//    second sweep computes each chunk's exclusive prefix sum of "continues"
//    with a block scan, carries the running total across chunks and writes
//    every row index to its slot of `order`. The count lands in num_continue
//    on the device; nothing is copied to the host.
//
// exit_partition_scatter (the engine's per-exit call) is two launches too:
// the confidence kernel extended to decide each row and copy a leaving row to
// the results, then the partition of the stored decisions.
#include "../exit_partition.h"
#include "../exit_partition_math.h"
#include "../scatter_exits_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

namespace ranet_fast::ops {

namespace {

namespace math = exit_partition_math;
namespace scatter_math = scatter_exits_math;
using math::Criterion;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullWarpMask = 0xffffffffu;
// Threads of the partition block: the most a block may have, so that each
// sweep over N rows takes the fewest chunks.
constexpr int kPartitionThreads = 1024;
constexpr int kPartitionWarps = kPartitionThreads / kWarpSize;

// The lane `offset` above's state; the weighted sum only travels when the
// criterion uses it, so that max_softmax moves no more than it needs.
template <Criterion criterion, typename acc_t>
__device__ math::PartitionState<acc_t> shuffle_down(
    const math::PartitionState<acc_t>& state,
    int offset) {
  math::PartitionState<acc_t> other;
  other.row.max_value =
      __shfl_down_sync(kFullWarpMask, state.row.max_value, offset);
  other.row.sum_exp = __shfl_down_sync(kFullWarpMask, state.row.sum_exp, offset);
  other.row.index = __shfl_down_sync(
      kFullWarpMask, static_cast<long long>(state.row.index), offset);
  other.weighted_sum = criterion == Criterion::kEntropy
      ? __shfl_down_sync(kFullWarpMask, state.weighted_sum, offset)
      : acc_t(0);
  return other;
}

// The state of one row folded by a whole warp: each lane folds a strided
// slice of the columns, and the 32 partial states are merged with shuffles,
// so lane 0 ends with the whole row's state. Every lane must call it.
template <Criterion criterion, typename scalar_t, typename acc_t>
__device__ math::PartitionState<acc_t> fold_row_in_warp(
    const scalar_t* __restrict__ row_logits,
    int64_t num_classes,
    int lane) {
  math::PartitionState<acc_t> state = math::empty_state<acc_t>();
  for (int64_t column = lane; column < num_classes; column += kWarpSize) {
    math::update<criterion>(state, static_cast<acc_t>(row_logits[column]), column);
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    state = math::combine<criterion>(state, shuffle_down<criterion>(state, offset));
  }
  return state;
}

template <Criterion criterion, typename scalar_t, typename acc_t>
__global__ void confidence_warp_per_row_kernel(
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
  const math::PartitionState<acc_t> state =
      fold_row_in_warp<criterion, scalar_t, acc_t>(logits + row * num_classes, num_classes, lane);
  if (lane == 0) {
    confidence[row] = math::confidence<criterion>(state, num_classes);
    prediction[row] = state.row.index;
  }
}

// Inclusive prefix sum of `value` over the block's threads in thread order;
// also returns the block's total in `block_total`. Every thread of the block
// must call it. `warp_sums` is shared scratch of kPartitionWarps entries.
__device__ int block_inclusive_scan(int value, int* warp_sums, int& block_total) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int neighbour = __shfl_up_sync(kFullWarpMask, value, offset);
    if (lane >= offset) {
      value += neighbour;
    }
  }
  if (lane == kWarpSize - 1) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    // kPartitionWarps == kWarpSize, so one warp scans the warp totals.
    int warp_total = warp_sums[lane];
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int neighbour = __shfl_up_sync(kFullWarpMask, warp_total, offset);
      if (lane >= offset) {
        warp_total += neighbour;
      }
    }
    warp_sums[lane] = warp_total;
  }
  __syncthreads();
  if (warp > 0) {
    value += warp_sums[warp - 1];
  }
  block_total = warp_sums[kPartitionWarps - 1];
  // warp_sums is overwritten by the next call.
  __syncthreads();
  return value;
}

// exit_partition's decision: the row's confidence reaches the threshold.
template <typename acc_t>
struct ConfidenceReaches {
  const acc_t* __restrict__ confidence;
  acc_t threshold;
  __device__ bool operator()(int64_t row) const {
    return math::leaves(confidence[row], threshold);
  }
};

// exit_partition_scatter's decision, made and stored by its first kernel.
struct StoredDecision {
  const bool* __restrict__ leaves;
  __device__ bool operator()(int64_t row) const {
    return leaves[row];
  }
};

template <typename LeavesAt>
__global__ void __launch_bounds__(kPartitionThreads) stable_partition_kernel(
    LeavesAt leaves_at,
    int64_t num_rows,
    int64_t* __restrict__ order,
    int64_t* __restrict__ num_continue_out) {
  static_assert(
      kPartitionWarps == kWarpSize, "the second scan level is one warp wide");
  __shared__ int warp_sums[kPartitionWarps];
  int chunk_total = 0;

  int64_t num_continue = 0;
  for (int64_t start = 0; start < num_rows; start += kPartitionThreads) {
    const int64_t row = start + threadIdx.x;
    const int continues = row < num_rows && !leaves_at(row) ? 1 : 0;
    block_inclusive_scan(continues, warp_sums, chunk_total);
    num_continue += chunk_total;
  }

  int64_t continuing_before_chunk = 0;
  for (int64_t start = 0; start < num_rows; start += kPartitionThreads) {
    const int64_t row = start + threadIdx.x;
    const bool valid = row < num_rows;
    const bool leaves_now = valid && leaves_at(row);
    const int continues = valid && !leaves_now ? 1 : 0;
    const int inclusive = block_inclusive_scan(continues, warp_sums, chunk_total);
    if (valid) {
      const int64_t continuing_before =
          continuing_before_chunk + inclusive - continues;
      order[math::partition_destination(
          leaves_now, row, continuing_before, num_continue)] = row;
    }
    continuing_before_chunk += chunk_total;
  }
  if (threadIdx.x == 0) {
    *num_continue_out = num_continue;
  }
}

// exit_partition_scatter's first kernel: one warp per row folds the row as
// confidence_warp_per_row_kernel does, lane 0 decides, and if the row leaves
// the whole warp copies it to its result row (leaving is a per-row decision,
// so no other row is needed). The decision goes to `leaves` for the
// partition kernel. Positions cannot be checked on the host without a sync;
// an out-of-range one trips a device assertion instead of writing stray memory.
template <Criterion criterion, typename scalar_t, typename acc_t>
__global__ void decide_and_scatter_warp_per_row_kernel(
    const scalar_t* __restrict__ logits,
    int64_t num_rows,
    int64_t num_classes,
    acc_t threshold,
    const int64_t* __restrict__ positions,
    int64_t exit_index,
    scalar_t* __restrict__ result_logits,
    int64_t result_row_stride,
    int64_t result_column_stride,
    int64_t num_results,
    int64_t* __restrict__ result_exit,
    int64_t result_exit_stride,
    bool* __restrict__ leaves) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock +
      threadIdx.x / kWarpSize;
  // The whole warp shares `row`, so the full-mask shuffles below always run
  // with all 32 lanes present.
  if (row >= num_rows) {
    return;
  }
  const scalar_t* row_logits = logits + row * num_classes;
  const math::PartitionState<acc_t> state =
      fold_row_in_warp<criterion, scalar_t, acc_t>(row_logits, num_classes, lane);
  const bool lane0_leaves =
      lane == 0 && math::leaves(math::confidence<criterion>(state, num_classes), threshold);
  const bool leaves_now = __shfl_sync(kFullWarpMask, lane0_leaves, 0);
  if (lane == 0) {
    leaves[row] = leaves_now;
  }
  if (!leaves_now) {
    return;
  }
  const int64_t position = positions[row];
  CUDA_KERNEL_ASSERT(scatter_math::in_range(position, num_results));
  for (int64_t column = lane; column < num_classes; column += kWarpSize) {
    result_logits[scatter_math::offset_2d(position, column, result_row_stride, result_column_stride)] =
        row_logits[column];
  }
  if (lane == 0) {
    result_exit[position * result_exit_stride] = exit_index;
  }
}

template <Criterion criterion, typename scalar_t>
void launch_confidence(
    const at::Tensor& logits,
    const at::Tensor& confidence,
    const at::Tensor& prediction,
    cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rows = logits.size(0);
  const int64_t num_blocks = (num_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(
      num_blocks <= std::numeric_limits<int>::max(),
      "ranet_fast: too many rows of logits (",
      num_rows,
      ")");
  confidence_warp_per_row_kernel<criterion, scalar_t, acc_t>
      <<<static_cast<unsigned>(num_blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(),
          num_rows,
          logits.size(1),
          confidence.mutable_data_ptr<acc_t>(),
          prediction.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void confidence_write(
    const at::Tensor& logits, Criterion criterion, const at::Tensor& confidence, const at::Tensor& prediction) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  // c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream
  // forwards to; ATen/cuda/CUDAContext.h would also pull in cuBLAS/cuSPARSE
  // headers that a minimal CUDA toolkit lacks.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "exit_confidence_cuda", [&] {
    auto launch = criterion == Criterion::kEntropy ? &launch_confidence<Criterion::kEntropy, scalar_t>
                                                   : &launch_confidence<Criterion::kMaxSoftmax, scalar_t>;
    launch(logits, confidence, prediction, stream);
  });
}

void partition_write(
    const at::Tensor& confidence, double threshold, const at::Tensor& order, const at::Tensor& num_continue) {
  const c10::cuda::CUDAGuard device_guard(confidence.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(confidence.scalar_type(), "exit_partition_cuda", [&] {
    // One block, launched for N == 0 too (it writes num_continue = 0); the
    // threshold is rounded on the host.
    stable_partition_kernel<<<1, kPartitionThreads, 0, stream>>>(
        ConfidenceReaches<scalar_t>{confidence.const_data_ptr<scalar_t>(), static_cast<scalar_t>(threshold)},
        confidence.size(0),
        order.mutable_data_ptr<int64_t>(),
        num_continue.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <Criterion criterion, typename scalar_t>
void launch_decide_and_scatter(const PartitionScatterArgs& args, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rows = args.logits.size(0);
  const int64_t num_blocks = (num_rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(
      num_blocks <= std::numeric_limits<int>::max(),
      "ranet_fast: too many rows of logits (",
      num_rows,
      ")");
  decide_and_scatter_warp_per_row_kernel<criterion, scalar_t, acc_t>
      <<<static_cast<unsigned>(num_blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
          args.logits.const_data_ptr<scalar_t>(),
          num_rows,
          args.logits.size(1),
          // Doubles beyond float's range round to +-inf, as on the CPU.
          static_cast<acc_t>(args.threshold),
          args.positions.const_data_ptr<int64_t>(),
          args.exit_index,
          args.result_logits.mutable_data_ptr<scalar_t>(),
          args.result_logits.stride(0),
          args.result_logits.stride(1),
          args.result_logits.size(0),
          args.result_exit.mutable_data_ptr<int64_t>(),
          args.result_exit.stride(0),
          args.leaves.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Two launches on one stream: decide and scatter (a grid over the rows), then
// the one-block partition of the stored decisions.
void partition_scatter_write(const PartitionScatterArgs& args) {
  const c10::cuda::CUDAGuard device_guard(args.logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_rows = args.logits.size(0);
  if (num_rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, args.logits.scalar_type(), "exit_partition_scatter_cuda", [&] {
          auto launch = args.criterion == Criterion::kEntropy
              ? &launch_decide_and_scatter<Criterion::kEntropy, scalar_t>
              : &launch_decide_and_scatter<Criterion::kMaxSoftmax, scalar_t>;
          launch(args, stream);
        });
  }
  // Launched for N == 0 too: it writes num_continue = 0.
  stable_partition_kernel<<<1, kPartitionThreads, 0, stream>>>(
      StoredDecision{args.leaves.const_data_ptr<bool>()},
      num_rows,
      args.order.mutable_data_ptr<int64_t>(),
      args.num_continue.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CUDA, m) {
  register_exit_kernels<confidence_write, partition_write, partition_scatter_write>(m);
}

} // namespace ranet_fast::ops
