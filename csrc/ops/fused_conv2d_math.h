// Per-element arithmetic and indexing of fused_conv2d, shared by the CPU and
// CUDA kernels.
//
// The op computes act(es[co] * conv2d(pro(x), w)[co] + eh[co]) where
// pro(x) = relu(x * ps[ci] + ph[ci]) is applied to the real input elements
// only (the zero padding stays zero, as in eager BN -> ReLU -> conv).
//
// The CUDA kernel is an implicit GEMM: row m of the GEMM is an output pixel
// (n, oh, ow) and column co an output channel; the reduction index k runs
// over (ci, kh, kw) in the weight's memory order, so the weight [Co, Ci, k, k]
// is a row-major [Co, K] matrix. The helpers below map those indices to
// tensor coordinates.
//
// ReLU is written as `a < 0 ? 0 : a` so that a NaN passes through, as
// torch.relu lets it.
//
// C10_HOST_DEVICE expands to `__host__ __device__` under nvcc and to nothing
// in a host-only (CppExtension) build.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace ranet_fast::ops::fused_conv2d_math {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t relu(acc_t value) {
  return value < acc_t(0) ? acc_t(0) : value;
}

// The prologue and the epilogue are both per-channel affine maps, optionally
// followed by ReLU. The kernels look the channel's map up once (per plane,
// per tile column) and apply it in their inner loops.
template <typename acc_t>
struct ChannelAffine {
  acc_t scale;
  acc_t shift;
  bool relu;
};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t apply_affine(const ChannelAffine<acc_t>& affine, acc_t value) {
  const acc_t mapped = value * affine.scale + affine.shift;
  return affine.relu ? relu(mapped) : mapped;
}

// The prologue of input channel ci: relu(x * scale + shift).
template <typename acc_t>
C10_HOST_DEVICE inline ChannelAffine<acc_t> prologue_affine(
    const acc_t* scale,
    const acc_t* shift,
    int64_t channel) {
  return {scale[channel], shift[channel], true};
}

// The epilogue of output channel co. A null scale means 1 and a null shift 0
// (the op's optional epilogue tensors): multiplying by 1 and adding 0 leave
// every value as it is.
template <typename acc_t>
C10_HOST_DEVICE inline ChannelAffine<acc_t> epilogue_affine(
    const acc_t* scale,
    const acc_t* shift,
    int64_t channel,
    bool apply_relu) {
  return {scale != nullptr ? scale[channel] : acc_t(1), shift != nullptr ? shift[channel] : acc_t(0), apply_relu};
}

// Output size of a convolution along one axis.
C10_HOST_DEVICE inline int64_t conv_output_size(
    int64_t input_size,
    int64_t kernel,
    int64_t stride,
    int64_t padding) {
  return (input_size + 2 * padding - kernel) / stride + 1;
}

// Input coordinate read by output coordinate `out` at kernel tap `tap`; it
// may lie in the padding (< 0 or >= the input size).
C10_HOST_DEVICE inline int64_t input_coordinate(
    int64_t out,
    int64_t tap,
    int64_t stride,
    int64_t padding) {
  return out * stride - padding + tap;
}

// GEMM row m -> output pixel (n, oh, ow), pixels in NHW order.
struct Pixel {
  int64_t n;
  int64_t oh;
  int64_t ow;
};

C10_HOST_DEVICE inline Pixel pixel_of_row(int64_t m, int64_t out_h, int64_t out_w) {
  Pixel pixel;
  pixel.ow = m % out_w;
  const int64_t rest = m / out_w;
  pixel.oh = rest % out_h;
  pixel.n = rest / out_h;
  return pixel;
}

// GEMM reduction index k -> (ci, kh, kw), the weight's memory order.
struct Tap {
  int64_t ci;
  int64_t kh;
  int64_t kw;
};

C10_HOST_DEVICE inline Tap tap_of_reduction(int64_t k, int64_t kernel) {
  Tap tap;
  tap.kw = k % kernel;
  const int64_t rest = k / kernel;
  tap.kh = rest % kernel;
  tap.ci = rest / kernel;
  return tap;
}

} // namespace ranet_fast::ops::fused_conv2d_math
