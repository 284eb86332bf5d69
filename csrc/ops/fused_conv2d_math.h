// Per-element arithmetic and indexing of fused_conv2d, shared by the CPU and
// CUDA kernels.
//
// The op computes act(es[co] * conv2d(pro(x), w)[co] + eh[co]) where
// pro(x) = prologue_act(x * ps[ci] + ph[ci]) is applied to the real input
// elements only (the zero padding stays zero, as in eager BN -> act -> conv).
// Both activations are one of the Activation codes below.
//
// The CUDA kernel is an implicit GEMM: row m of the GEMM is an output pixel
// (n, oh, ow) and column co an output channel; the reduction index k runs
// over (ci, kh, kw) in the weight's memory order, so the weight [Co, Ci, k, k]
// is a row-major [Co, K] matrix. The helpers below map those indices to
// tensor coordinates.
//
// The clamps (ReLU, ReLU6, Hardswish's) are written as comparisons that are
// false for NaN, so that a NaN passes through as torch's activations let it.
//
// C10_HOST_DEVICE expands to `__host__ __device__` under nvcc and to nothing
// in a host-only (CppExtension) build.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace ranet_fast::ops::fused_conv2d_math {

// The activations, by their index in ACTIVATIONS of ranet_fast/ops/fused_conv2d.py
// (the schemas take them as ints).
enum class Activation : int64_t {
  kNone = 0,
  kRelu = 1,
  kRelu6 = 2,
  kSilu = 3,
  kGelu = 4, // the erf form, nn.GELU's default
  kHardswish = 5,
  kLeakyRelu = 6,
};
constexpr int64_t kActivationCount = 7;

// Each activation as torch.nn.functional computes it (same formula and order
// of operations, so float32 results agree to rounding).
template <Activation kind, typename acc_t>
C10_HOST_DEVICE inline acc_t activate(acc_t value, acc_t negative_slope) {
  if constexpr (kind == Activation::kRelu) {
    return value < acc_t(0) ? acc_t(0) : value;
  } else if constexpr (kind == Activation::kRelu6) {
    return value < acc_t(0) ? acc_t(0) : (value > acc_t(6) ? acc_t(6) : value);
  } else if constexpr (kind == Activation::kSilu) {
    return value / (acc_t(1) + std::exp(-value));
  } else if constexpr (kind == Activation::kGelu) {
    return value * acc_t(0.5) * (acc_t(1) + std::erf(value * acc_t(0.70710678118654752440)));
  } else if constexpr (kind == Activation::kHardswish) {
    const acc_t shifted = value + acc_t(3);
    const acc_t gate = shifted < acc_t(0) ? acc_t(0) : (shifted > acc_t(6) ? acc_t(6) : shifted);
    return value * gate / acc_t(6);
  } else if constexpr (kind == Activation::kLeakyRelu) {
    return value > acc_t(0) ? value : value * negative_slope;
  } else {
    return value;
  }
}

// The same with the activation chosen at run time (the CUDA kernel's loads).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t activate(Activation kind, acc_t value, acc_t negative_slope) {
  switch (kind) {
    case Activation::kRelu:
      return activate<Activation::kRelu>(value, negative_slope);
    case Activation::kRelu6:
      return activate<Activation::kRelu6>(value, negative_slope);
    case Activation::kSilu:
      return activate<Activation::kSilu>(value, negative_slope);
    case Activation::kGelu:
      return activate<Activation::kGelu>(value, negative_slope);
    case Activation::kHardswish:
      return activate<Activation::kHardswish>(value, negative_slope);
    case Activation::kLeakyRelu:
      return activate<Activation::kLeakyRelu>(value, negative_slope);
    default:
      return value;
  }
}

// The prologue and the epilogue are both per-channel affine maps followed by
// an activation. The kernels look the channel's map up once (per plane, per
// tile column) and apply it in their inner loops.
template <typename acc_t>
struct ChannelAffine {
  acc_t scale;
  acc_t shift;
  Activation activation;
  acc_t negative_slope;
};

template <typename acc_t>
C10_HOST_DEVICE inline acc_t apply_affine(const ChannelAffine<acc_t>& affine, acc_t value) {
  return activate(affine.activation, value * affine.scale + affine.shift, affine.negative_slope);
}

// The prologue of input channel ci: act(x * scale + shift).
template <typename acc_t>
C10_HOST_DEVICE inline ChannelAffine<acc_t> prologue_affine(
    const acc_t* scale,
    const acc_t* shift,
    int64_t channel,
    Activation activation,
    acc_t negative_slope) {
  return {scale[channel], shift[channel], activation, negative_slope};
}

// The epilogue of output channel co. A null scale means 1 and a null shift 0
// (the op's optional epilogue tensors): multiplying by 1 and adding 0 leave
// every value as it is.
template <typename acc_t>
C10_HOST_DEVICE inline ChannelAffine<acc_t> epilogue_affine(
    const acc_t* scale,
    const acc_t* shift,
    int64_t channel,
    Activation activation,
    acc_t negative_slope) {
  return {
      scale != nullptr ? scale[channel] : acc_t(1),
      shift != nullptr ? shift[channel] : acc_t(0),
      activation,
      negative_slope};
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
