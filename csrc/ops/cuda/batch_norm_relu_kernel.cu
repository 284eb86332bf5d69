// CUDA kernels of the batch-norm training ops (batch_norm_relu.cpp).
//
// Reductions (batch_norm_stats, the sums of batch_norm_relu_backward) are two
// deterministic stages. Stage one: block (channel group, split) has
// kThreads threads arranged as channel lanes x pixel lanes: 32 x 8 when x's
// channels are innermost in memory (channels_last, or a channel slice of it),
// so that a warp reads 32 neighbouring channels of one pixel, else 1 x 256,
// so that a warp reads 32 neighbouring pixels of one channel. Each thread
// folds its strided share of the split's pixels (Welford for the statistics),
// the pixel lanes are combined by a fixed shared-memory tree, and one partial
// per channel and split is stored. Stage two: one thread per channel combines
// its partials in split order. The splits depend on the shape only, and
// nothing uses atomics, so results are bitwise reproducible.
//
// Elementwise kernels (the forward, the backward's grad_x) use one thread per
// element, numbered in the memory order of x's layout (batch_norm_relu_math.h
// element_of), with grid-stride loops. Every tensor is addressed through its
// strides. Indices are 32-bit where they fit (64-bit division costs several
// times more on the GPU); memory offsets are always 64-bit.
#include "../batch_norm_relu.h"
#include "../batch_norm_relu_math.h"
#include "../layout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace ranet_fast::ops {

namespace {

namespace math = batch_norm_relu_math;

constexpr int kThreads = 256;
constexpr int kChannelLanesInner = 32;
// Each thread of a reduction folds at least this many pixels of its split...
constexpr int64_t kMinPixelsPerThread = 16;
// ...and a channel has at most this many splits (stage two walks them serially).
constexpr int64_t kMaxSplits = 512;
// Grid-stride elementwise kernels launch at most this many blocks.
constexpr int64_t kMaxElementwiseBlocks = 65536;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// How a reduction over x's pixels is cut: a function of the shape and layout only.
struct Partition {
  int channel_lanes;
  int64_t pixels_per_split;
  int64_t splits;
  int64_t channel_groups;
};

Partition partition_of(const at::Tensor& x) {
  Partition p;
  p.channel_lanes = channels_inner(x) ? kChannelLanesInner : 1;
  const int64_t pixels = x.size(0) * x.size(2) * x.size(3);
  const int64_t pixel_lanes = kThreads / p.channel_lanes;
  p.pixels_per_split = std::max(pixel_lanes * kMinPixelsPerThread, ceil_div(pixels, kMaxSplits));
  p.splits = ceil_div(pixels, p.pixels_per_split);
  p.channel_groups = ceil_div(x.size(1), p.channel_lanes);
  TORCH_CHECK(
      p.channel_groups <= std::numeric_limits<int32_t>::max(), "ranet_fast batch norm: too many channels");
  return p;
}

// Whether every index of the kernels fits int32_t with room for a grid stride.
bool fits_int32(int64_t count) {
  return count + kMaxElementwiseBlocks * kThreads < std::numeric_limits<int32_t>::max();
}

template <typename index_t>
struct Geometry {
  index_t channels, height, width, pixels;
};

template <typename index_t>
Geometry<index_t> geometry_of(const at::Tensor& x) {
  return {static_cast<index_t>(x.size(1)), static_cast<index_t>(x.size(2)), static_cast<index_t>(x.size(3)),
          static_cast<index_t>(x.size(0) * x.size(2) * x.size(3))};
}

// Combines the values of a block's pixel lanes (same channel lane) with a
// fixed tree; the result is in shared[threadIdx.x] of pixel lane 0.
template <typename T, typename Combine>
__device__ void combine_pixel_lanes(T* shared, T value, int channel_lanes, const Combine& combine) {
  const int pixel_lane = threadIdx.x / channel_lanes;
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int offset = kThreads / channel_lanes / 2; offset > 0; offset /= 2) {
    if (pixel_lane < offset) {
      shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + offset * channel_lanes]);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// batch_norm_stats
// ---------------------------------------------------------------------------

// Functors rather than function pointers, so that the combining calls inline.
template <typename acc_t>
struct MergeMoments {
  __device__ math::Moments<acc_t> operator()(const math::Moments<acc_t>& a, const math::Moments<acc_t>& b) const {
    return math::merge(a, b);
  }
};

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) moments_partials_kernel(
    const scalar_t* __restrict__ x,
    const Strides4 s,
    const Geometry<index_t> g,
    const int channel_lanes,
    const index_t pixels_per_split,
    math::Moments<acc_t>* __restrict__ partials) {
  __shared__ math::Moments<acc_t> shared[kThreads];
  const int channel_lane = threadIdx.x % channel_lanes;
  const index_t pixel_lanes = kThreads / channel_lanes;
  const index_t channel = static_cast<index_t>(blockIdx.x) * channel_lanes + channel_lane;
  const index_t split = blockIdx.y;
  const index_t begin = split * pixels_per_split;
  const index_t end = g.pixels - begin < pixels_per_split ? g.pixels : begin + pixels_per_split;
  math::Moments<acc_t> moments{0, acc_t(0), acc_t(0)};
  if (channel < g.channels) {
    const scalar_t* channel_base = x + static_cast<int64_t>(channel) * s.c;
    for (index_t p = begin + static_cast<index_t>(threadIdx.x / channel_lanes); p < end; p += pixel_lanes) {
      moments = math::add(
          moments,
          static_cast<acc_t>(channel_base[math::pixel_offset<index_t>(p, g.height, g.width, s.n, s.h, s.w)]));
    }
  }
  combine_pixel_lanes(shared, moments, channel_lanes, MergeMoments<acc_t>());
  if (threadIdx.x < channel_lanes && channel < g.channels) {
    partials[static_cast<int64_t>(channel) * gridDim.y + split] = shared[threadIdx.x];
  }
}

template <typename acc_t>
__global__ void moments_combine_kernel(
    const math::Moments<acc_t>* __restrict__ partials,
    int64_t splits,
    int64_t channels,
    acc_t* __restrict__ mean,
    acc_t* __restrict__ var) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (channel >= channels) {
    return;
  }
  math::Moments<acc_t> total{0, acc_t(0), acc_t(0)};
  for (int64_t split = 0; split < splits; ++split) {
    total = math::merge(total, partials[channel * splits + split]);
  }
  mean[channel] = total.mean;
  var[channel] = total.m2 / static_cast<acc_t>(total.count);
}

// Scratch memory for `count` partials of type T.
template <typename T>
T* scratch(at::Tensor& storage, const at::Tensor& like, int64_t count) {
  storage = at::empty({count * static_cast<int64_t>(sizeof(T))}, like.options().dtype(at::kByte));
  return reinterpret_cast<T*>(storage.mutable_data_ptr<uint8_t>());
}

void batch_norm_stats_write(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(x.device());
  const Partition partition = partition_of(x);
  const int64_t channels = x.size(1);
  TORCH_CHECK(partition.splits <= 65535, "ranet_fast::batch_norm_stats: too many splits");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor storage;
    math::Moments<acc_t>* partials = scratch<math::Moments<acc_t>>(storage, x, channels * partition.splits);
    const dim3 grid(static_cast<unsigned int>(partition.channel_groups), static_cast<unsigned int>(partition.splits));
    const int64_t pixels = x.size(0) * x.size(2) * x.size(3);
    if (fits_int32(pixels + partition.pixels_per_split) && fits_int32(channels)) {
      moments_partials_kernel<scalar_t, acc_t, int32_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), strides_of(x), geometry_of<int32_t>(x), partition.channel_lanes,
          static_cast<int32_t>(partition.pixels_per_split), partials);
    } else {
      moments_partials_kernel<scalar_t, acc_t, int64_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), strides_of(x), geometry_of<int64_t>(x), partition.channel_lanes,
          partition.pixels_per_split, partials);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    moments_combine_kernel<acc_t><<<static_cast<unsigned int>(ceil_div(channels, kThreads)), kThreads, 0, stream>>>(
        partials, partition.splits, channels, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------
// batch_norm_relu{,_out}
// ---------------------------------------------------------------------------

template <typename acc_t>
struct ChannelVectors {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  const acc_t* bias;
};

template <typename acc_t>
ChannelVectors<acc_t> channel_vectors(const BatchNormParams& params) {
  return {params.mean.const_data_ptr<acc_t>(), params.invstd.const_data_ptr<acc_t>(),
          params.weight.const_data_ptr<acc_t>(), params.bias.const_data_ptr<acc_t>()};
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ x,
    const Strides4 sx,
    scalar_t* __restrict__ out,
    const Strides4 so,
    const ChannelVectors<acc_t> v,
    const Geometry<index_t> g,
    const index_t numel,
    const bool inner,
    const bool relu) {
  const index_t plane = g.height * g.width;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; e < numel;
       e += static_cast<index_t>(gridDim.x) * kThreads) {
    const math::Element<index_t> element = math::element_of(e, g.channels, plane, inner);
    const int64_t c = element.channel;
    const acc_t value = static_cast<acc_t>(
        x[c * sx.c + math::pixel_offset(element.pixel, g.height, g.width, sx.n, sx.h, sx.w)]);
    out[c * so.c + math::pixel_offset(element.pixel, g.height, g.width, so.n, so.h, so.w)] = static_cast<scalar_t>(
        math::forward(math::channel_norm(v.mean, v.invstd, v.weight, v.bias, c), value, relu));
  }
}

unsigned int elementwise_blocks(int64_t numel) {
  return static_cast<unsigned int>(std::min(ceil_div(numel, kThreads), kMaxElementwiseBlocks));
}

void batch_norm_relu_write(const at::Tensor& dst, const at::Tensor& x, const BatchNormParams& params, bool relu) {
  const int64_t numel = x.numel();
  if (numel == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool inner = channels_inner(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelVectors<acc_t> vectors = channel_vectors<acc_t>(params);
    if (fits_int32(numel)) {
      forward_kernel<scalar_t, acc_t, int32_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), strides_of(x), dst.mutable_data_ptr<scalar_t>(), strides_of(dst), vectors,
          geometry_of<int32_t>(x), static_cast<int32_t>(numel), inner, relu);
    } else {
      forward_kernel<scalar_t, acc_t, int64_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), strides_of(x), dst.mutable_data_ptr<scalar_t>(), strides_of(dst), vectors,
          geometry_of<int64_t>(x), numel, inner, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------
// batch_norm_relu_backward
// ---------------------------------------------------------------------------

template <typename acc_t>
struct GradSums {
  acc_t dz;
  acc_t dz_xhat;
};

template <typename acc_t>
struct AddSums {
  __device__ GradSums<acc_t> operator()(const GradSums<acc_t>& a, const GradSums<acc_t>& b) const {
    return {a.dz + b.dz, a.dz_xhat + b.dz_xhat};
  }
};

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) grad_partials_kernel(
    const scalar_t* __restrict__ grad_out,
    const Strides4 sg,
    const scalar_t* __restrict__ x,
    const Strides4 sx,
    const ChannelVectors<acc_t> v,
    const Geometry<index_t> g,
    const int channel_lanes,
    const index_t pixels_per_split,
    const bool relu,
    GradSums<acc_t>* __restrict__ partials) {
  __shared__ GradSums<acc_t> shared[kThreads];
  const int channel_lane = threadIdx.x % channel_lanes;
  const index_t pixel_lanes = kThreads / channel_lanes;
  const index_t channel = static_cast<index_t>(blockIdx.x) * channel_lanes + channel_lane;
  const index_t split = blockIdx.y;
  const index_t begin = split * pixels_per_split;
  const index_t end = g.pixels - begin < pixels_per_split ? g.pixels : begin + pixels_per_split;
  GradSums<acc_t> sums{acc_t(0), acc_t(0)};
  if (channel < g.channels) {
    const math::ChannelNorm<acc_t> norm = math::channel_norm(v.mean, v.invstd, v.weight, v.bias, channel);
    const acc_t invstd = v.invstd[channel];
    const scalar_t* x_base = x + static_cast<int64_t>(channel) * sx.c;
    const scalar_t* grad_base = grad_out + static_cast<int64_t>(channel) * sg.c;
    for (index_t p = begin + static_cast<index_t>(threadIdx.x / channel_lanes); p < end; p += pixel_lanes) {
      const acc_t value = static_cast<acc_t>(x_base[math::pixel_offset(p, g.height, g.width, sx.n, sx.h, sx.w)]);
      const acc_t grad = static_cast<acc_t>(grad_base[math::pixel_offset(p, g.height, g.width, sg.n, sg.h, sg.w)]);
      const acc_t dz = math::grad_z(norm, value, grad, relu);
      sums.dz += dz;
      sums.dz_xhat += dz * math::xhat(norm, invstd, value);
    }
  }
  combine_pixel_lanes(shared, sums, channel_lanes, AddSums<acc_t>());
  if (threadIdx.x < channel_lanes && channel < g.channels) {
    partials[static_cast<int64_t>(channel) * gridDim.y + split] = shared[threadIdx.x];
  }
}

template <typename acc_t>
__global__ void grad_combine_kernel(
    const GradSums<acc_t>* __restrict__ partials,
    int64_t splits,
    int64_t channels,
    acc_t* __restrict__ grad_weight,
    acc_t* __restrict__ grad_bias) {
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (channel >= channels) {
    return;
  }
  GradSums<acc_t> total{acc_t(0), acc_t(0)};
  for (int64_t split = 0; split < splits; ++split) {
    total = AddSums<acc_t>()(total, partials[channel * splits + split]);
  }
  grad_bias[channel] = total.dz;
  grad_weight[channel] = total.dz_xhat;
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kThreads) grad_x_kernel(
    const scalar_t* __restrict__ grad_out,
    const Strides4 sg,
    const scalar_t* __restrict__ x,
    const Strides4 sx,
    scalar_t* __restrict__ grad_x,
    const Strides4 so,
    const ChannelVectors<acc_t> v,
    const acc_t* __restrict__ grad_weight,
    const acc_t* __restrict__ grad_bias,
    const Geometry<index_t> g,
    const index_t numel,
    const bool inner,
    const bool relu) {
  const index_t plane = g.height * g.width;
  for (index_t e = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; e < numel;
       e += static_cast<index_t>(gridDim.x) * kThreads) {
    const math::Element<index_t> element = math::element_of(e, g.channels, plane, inner);
    const int64_t c = element.channel;
    const acc_t value = static_cast<acc_t>(
        x[c * sx.c + math::pixel_offset(element.pixel, g.height, g.width, sx.n, sx.h, sx.w)]);
    const acc_t grad = static_cast<acc_t>(
        grad_out[c * sg.c + math::pixel_offset(element.pixel, g.height, g.width, sg.n, sg.h, sg.w)]);
    const math::ChannelGrad<acc_t> channel =
        math::channel_grad(v.mean, v.invstd, v.weight, v.bias, grad_weight, grad_bias, g.pixels, c);
    grad_x[c * so.c + math::pixel_offset(element.pixel, g.height, g.width, so.n, so.h, so.w)] =
        static_cast<scalar_t>(math::grad_x(channel, value, grad, relu));
  }
}

void batch_norm_relu_write_gradients(const at::Tensor& grad_out, const at::Tensor& x, const BatchNormParams& params,
                                     bool relu, const BatchNormReluGradients& gradients) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor& grad_x = gradients.grad_x;
  const Partition partition = partition_of(x);
  TORCH_CHECK(partition.splits <= 65535, "ranet_fast::batch_norm_relu_backward: too many splits");
  const int64_t channels = x.size(1), numel = x.numel();
  const bool inner = channels_inner(x);
  const bool use_int32 = fits_int32(numel + partition.pixels_per_split);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelVectors<acc_t> vectors = channel_vectors<acc_t>(params);
    at::Tensor storage;
    GradSums<acc_t>* partials = scratch<GradSums<acc_t>>(storage, x, channels * partition.splits);
    const dim3 grid(static_cast<unsigned int>(partition.channel_groups), static_cast<unsigned int>(partition.splits));
    const scalar_t* grad_data = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    if (use_int32) {
      grad_partials_kernel<scalar_t, acc_t, int32_t><<<grid, kThreads, 0, stream>>>(
          grad_data, strides_of(grad_out), x_data, strides_of(x), vectors, geometry_of<int32_t>(x),
          partition.channel_lanes, static_cast<int32_t>(partition.pixels_per_split), relu, partials);
    } else {
      grad_partials_kernel<scalar_t, acc_t, int64_t><<<grid, kThreads, 0, stream>>>(
          grad_data, strides_of(grad_out), x_data, strides_of(x), vectors, geometry_of<int64_t>(x),
          partition.channel_lanes, partition.pixels_per_split, relu, partials);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    acc_t* grad_weight_data = gradients.grad_weight.mutable_data_ptr<acc_t>();
    acc_t* grad_bias_data = gradients.grad_bias.mutable_data_ptr<acc_t>();
    grad_combine_kernel<acc_t><<<static_cast<unsigned int>(ceil_div(channels, kThreads)), kThreads, 0, stream>>>(
        partials, partition.splits, channels, grad_weight_data, grad_bias_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (use_int32) {
      grad_x_kernel<scalar_t, acc_t, int32_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
          grad_data, strides_of(grad_out), x_data, strides_of(x), grad_x.mutable_data_ptr<scalar_t>(),
          strides_of(grad_x), vectors, grad_weight_data, grad_bias_data, geometry_of<int32_t>(x),
          static_cast<int32_t>(numel), inner, relu);
    } else {
      grad_x_kernel<scalar_t, acc_t, int64_t><<<elementwise_blocks(numel), kThreads, 0, stream>>>(
          grad_data, strides_of(grad_out), x_data, strides_of(x), grad_x.mutable_data_ptr<scalar_t>(),
          strides_of(grad_x), vectors, grad_weight_data, grad_bias_data, geometry_of<int64_t>(x), numel, inner,
          relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CUDA, m) {
  register_batch_norm_kernels<batch_norm_stats_write, batch_norm_relu_write, batch_norm_relu_write_gradients>(m);
}

} // namespace ranet_fast::ops
