// CUDA kernels of ranet_fast::fused_conv2d{,_out}: a tiled implicit GEMM.
//
// GEMM rows are output pixels (n, oh, ow), columns output channels, and the
// reduction runs over (ci, kh, kw) (fused_conv2d_math.h). Each block computes
// a kTileM x kTileN output tile; per step of kTileK reductions its threads
// stage an input tile (gathered from x with the conv's indexing, zero in the
// padding, the BN -> activation prologue applied on load) and a weight tile in
// shared memory, then each thread accumulates its 4 x 4 outputs in acc_t
// (float32, float64 for float64). The epilogue is applied in registers and
// stored straight into the output's channel slice. x and out are read and
// written through their strides, so a channel prefix of a dense block's buffer
// is read in place and a layer's channels are written in place.
//
// Why this kernel stays SIMT (no mma.sync/WMMA): it is the correctness
// backend of the op on CUDA and one candidate of the measured dispatch
// (ranet_fast/dispatch.py times the cuda, triton and eager cuDNN forms per
// shape and keeps the fastest), not the fast path. Its products run on the
// FP32 FMA units: on an H200 about 60 TFLOP/s at best (67 in the datasheet,
// before the gather and shared-memory traffic of an implicit GEMM), against
// about 790 TFLOP/s of dense bf16 tensor-core work that cuDNN and the Triton
// kernel (native bf16/fp16 tl.dot, wgmma on sm_90) reach. A GEMM-heavy layer
// of RANet, e.g. a 3x3 conv of 128 -> 32 channels on 32x32 maps at batch
// 1024 (2 * 1024 * 32 * 32 * 32 * 128 * 9 = 77 GFLOP), needs at least 1.3 ms
// here and 0.1 ms on tensor cores: a 13x gap that tiling cannot close, so the
// dispatch picks cuDNN or Triton for such shapes. Writing a third
// tensor-core conv would duplicate those two; what this kernel keeps is the
// non-GEMM work in one pass (activation prologue on load, epilogue, writing
// into a channel slice) for the shapes where that, not the GEMM, dominates.
#include "../fused_conv2d.h"
#include "../fused_conv2d_math.h"
#include "../layout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace ranet_fast::ops {

namespace {

namespace math = fused_conv2d_math;

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;
// Each thread owns kPerThread x kPerThread outputs, strided by kThreadGrid so
// that neighbouring threads hold neighbouring pixels (coalesced NCHW stores).
constexpr int kThreadGrid = 16;
constexpr int kPerThread = kTileM / kThreadGrid;
static_assert(kTileM == kTileN && kThreadGrid * kThreadGrid == kThreads, "square thread grid");
static_assert(kTileM * kTileK % kThreads == 0 && kTileN * kTileK % kThreads == 0, "whole tile loads");
constexpr int kLoadsPerThread = kTileM * kTileK / kThreads;

template <typename scalar_t, typename acc_t>
struct ConvParams {
  const scalar_t* x;
  int64_t in_h, in_w;
  Strides4 x_strides;
  const scalar_t* weight; // contiguous [Co, K]
  int64_t out_channels, kernel, stride, padding;
  const acc_t* prologue_scale; // null: no prologue
  const acc_t* prologue_shift;
  const acc_t* epilogue_scale; // null: 1
  const acc_t* epilogue_shift; // null: 0
  math::Activation prologue_activation;
  math::Activation activation;
  acc_t negative_slope;
  scalar_t* out; // at channel out_offset of the output
  int64_t out_h, out_w;
  Strides4 out_strides;
  int64_t rows; // N * Ho * Wo
  int64_t reduction; // Ci * k * k
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fused_conv2d_kernel(const ConvParams<scalar_t, acc_t> p) {
  __shared__ acc_t input_tile[kTileK][kTileM];
  __shared__ acc_t weight_tile[kTileK][kTileN];
  const int thread = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t column0 = static_cast<int64_t>(blockIdx.y) * kTileN;

  // Each thread stages the same pixel of the input tile at every step; its
  // coordinates are decoded once.
  const int load_row = thread % kTileM;
  const int load_k = thread / kTileM;
  const int64_t pixel_row = row0 + load_row;
  const bool pixel_valid = pixel_row < p.rows;
  const math::Pixel pixel = math::pixel_of_row(pixel_valid ? pixel_row : 0, p.out_h, p.out_w);
  const scalar_t* x_sample = p.x + pixel.n * p.x_strides.n;

  const int thread_row = thread % kThreadGrid;
  const int thread_column = thread / kThreadGrid;
  acc_t accumulator[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      accumulator[i][j] = acc_t(0);
    }
  }

  for (int64_t k0 = 0; k0 < p.reduction; k0 += kTileK) {
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int kk = load_k + i * (kThreads / kTileM);
      const int64_t k = k0 + kk;
      acc_t value = acc_t(0);
      if (pixel_valid && k < p.reduction) {
        const math::Tap tap = math::tap_of_reduction(k, p.kernel);
        const int64_t ih = math::input_coordinate(pixel.oh, tap.kh, p.stride, p.padding);
        const int64_t iw = math::input_coordinate(pixel.ow, tap.kw, p.stride, p.padding);
        if (ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w) {
          value = static_cast<acc_t>(
              x_sample[tap.ci * p.x_strides.c + ih * p.x_strides.h + iw * p.x_strides.w]);
          if (p.prologue_scale != nullptr) {
            value = math::apply_affine(
                math::prologue_affine(
                    p.prologue_scale, p.prologue_shift, tap.ci, p.prologue_activation, p.negative_slope),
                value);
          }
        }
      }
      input_tile[kk][load_row] = value;
    }
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int element = thread + i * kThreads;
      const int column = element / kTileK;
      const int kk = element % kTileK;
      const int64_t channel = column0 + column;
      const int64_t k = k0 + kk;
      weight_tile[kk][column] = channel < p.out_channels && k < p.reduction
          ? static_cast<acc_t>(p.weight[channel * p.reduction + k])
          : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      acc_t a[kPerThread];
      acc_t b[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        a[i] = input_tile[kk][thread_row + i * kThreadGrid];
        b[i] = weight_tile[kk][thread_column + i * kThreadGrid];
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
          accumulator[i][j] += a[i] * b[j];
        }
      }
    }
    __syncthreads();
  }

  math::ChannelAffine<acc_t> epilogue[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t channel = column0 + thread_column + j * kThreadGrid;
    epilogue[j] = math::epilogue_affine(
        p.epilogue_scale,
        p.epilogue_shift,
        channel < p.out_channels ? channel : 0,
        p.activation,
        p.negative_slope);
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = row0 + thread_row + i * kThreadGrid;
    if (row >= p.rows) {
      continue;
    }
    const math::Pixel out_pixel = math::pixel_of_row(row, p.out_h, p.out_w);
    scalar_t* out_pixel_ptr = p.out + out_pixel.n * p.out_strides.n + out_pixel.oh * p.out_strides.h +
        out_pixel.ow * p.out_strides.w;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t channel = column0 + thread_column + j * kThreadGrid;
      if (channel < p.out_channels) {
        out_pixel_ptr[channel * p.out_strides.c] =
            static_cast<scalar_t>(math::apply_affine(epilogue[j], accumulator[i][j]));
      }
    }
  }
}

template <typename acc_t>
const acc_t* optional_data(const c10::optional<at::Tensor>& vector) {
  return vector.has_value() ? vector->const_data_ptr<acc_t>() : nullptr;
}

void fused_conv2d_write(const at::Tensor& out_slice, const FusedConv2dArgs& args) {
  if (out_slice.numel() == 0) {
    return;
  }
  const at::Tensor& x = args.x;
  const at::Tensor& weight = args.weight;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dense_weight = weight.contiguous();
  const int64_t rows = out_slice.size(0) * out_slice.size(2) * out_slice.size(3);
  const dim3 grid(
      static_cast<unsigned int>((rows + kTileM - 1) / kTileM),
      static_cast<unsigned int>((weight.size(0) + kTileN - 1) / kTileN));
  TORCH_CHECK(
      grid.y <= 65535, "ranet_fast::fused_conv2d: too many output channels (", weight.size(0), ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ConvParams<scalar_t, acc_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.in_h = x.size(2);
    p.in_w = x.size(3);
    p.x_strides = strides_of(x);
    p.weight = dense_weight.const_data_ptr<scalar_t>();
    p.out_channels = weight.size(0);
    p.kernel = weight.size(2);
    p.stride = args.stride;
    p.padding = args.padding;
    p.prologue_scale = optional_data<acc_t>(args.prologue_scale);
    p.prologue_shift = optional_data<acc_t>(args.prologue_shift);
    p.epilogue_scale = optional_data<acc_t>(args.epilogue_scale);
    p.epilogue_shift = optional_data<acc_t>(args.epilogue_shift);
    p.prologue_activation = args.prologue_activation;
    p.activation = args.activation;
    p.negative_slope = static_cast<acc_t>(args.negative_slope);
    p.out = out_slice.mutable_data_ptr<scalar_t>();
    p.out_h = out_slice.size(2);
    p.out_w = out_slice.size(3);
    p.out_strides = strides_of(out_slice);
    p.rows = rows;
    p.reduction = weight.size(1) * weight.size(2) * weight.size(3);
    fused_conv2d_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CUDA, m) {
  register_fused_conv2d_kernels<write_into_new_output<fused_conv2d_write>, fused_conv2d_write>(m);
}

} // namespace ranet_fast::ops
