// Per-element arithmetic and indexing of the batch-norm training ops
// (batch_norm_stats, batch_norm_relu, batch_norm_relu_backward), shared by the
// CPU and CUDA kernels.
//
// Statistics are Moments (count, mean, M2 = sum of squared deviations from the
// mean) over a set of elements of one channel. A thread or a chunk of data
// builds its own Moments, either one element at a time (add, Welford) or from
// shifted sums over a chunk (from_shifted_sums, the corrected two-pass
// formula), and partial Moments over disjoint sets are merged (merge, Chan et
// al.). Nothing subtracts E[x]^2 from E[x^2], so a channel whose mean is large
// against its spread keeps its variance. The merge order is fixed by the
// kernels, never by thread timing, so results are deterministic.
//
// The normalisation of channel c is z = (x - mean) * scale + shift with
// scale = invstd * weight, shift = bias, followed by ReLU written as
// `z < 0 ? 0 : z` so that a NaN passes through, as torch.relu lets it. The
// backward recomputes z with the same helper, so its ReLU mask (z > 0) is the
// forward's exactly.
//
// C10_HOST_DEVICE expands to `__host__ __device__` under nvcc and to nothing
// in a host-only (CppExtension) build.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace ranet_fast::ops::batch_norm_relu_math {

template <typename acc_t>
struct Moments {
  int64_t count;
  acc_t mean;
  acc_t m2; // sum of squared deviations from mean
};

// Welford's update with one more element.
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> add(Moments<acc_t> moments, acc_t value) {
  moments.count += 1;
  const acc_t delta = value - moments.mean;
  moments.mean += delta / static_cast<acc_t>(moments.count);
  moments.m2 += delta * (value - moments.mean);
  return moments;
}

// Chan et al.'s merge of the Moments of two disjoint sets; either may be empty.
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.count == 0) {
    return a;
  }
  if (a.count == 0) {
    return b;
  }
  const int64_t count = a.count + b.count;
  const acc_t fraction = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  const acc_t delta = b.mean - a.mean;
  return {count, a.mean + delta * fraction, a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * fraction};
}

// The Moments of `count` elements from s1 = sum(x - shift) and
// s2 = sum((x - shift)^2), shift close to their mean (e.g. a first pass's
// mean): the corrected two-pass algorithm. The correction s1^2 / count
// removes the error of the shift to first order; rounding can leave M2 a few
// ulps below zero, which is clamped (`< 0` keeps a NaN).
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> from_shifted_sums(int64_t count, acc_t shift, acc_t s1, acc_t s2) {
  const acc_t n = static_cast<acc_t>(count);
  const acc_t m2 = s2 - s1 * s1 / n;
  return {count, shift + s1 / n, m2 < acc_t(0) ? acc_t(0) : m2};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t relu(acc_t value) {
  return value < acc_t(0) ? acc_t(0) : value;
}

// Everything the forward needs about one channel.
template <typename acc_t>
struct ChannelNorm {
  acc_t mean;
  acc_t scale; // invstd * weight
  acc_t shift; // bias
};

template <typename acc_t>
C10_HOST_DEVICE inline ChannelNorm<acc_t> channel_norm(
    const acc_t* mean,
    const acc_t* invstd,
    const acc_t* weight,
    const acc_t* bias,
    int64_t channel) {
  return {mean[channel], invstd[channel] * weight[channel], bias[channel]};
}

// z = (x - mean) * invstd * weight + bias, before the activation.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t normalize(const ChannelNorm<acc_t>& norm, acc_t value) {
  return (value - norm.mean) * norm.scale + norm.shift;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t forward(const ChannelNorm<acc_t>& norm, acc_t value, bool apply_relu) {
  const acc_t z = normalize(norm, value);
  return apply_relu ? relu(z) : z;
}

// The gradient reaching z: grad_out where the ReLU passed z (z > 0), else 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t grad_z(const ChannelNorm<acc_t>& norm, acc_t value, acc_t grad_out, bool apply_relu) {
  return !apply_relu || normalize(norm, value) > acc_t(0) ? grad_out : acc_t(0);
}

// Everything the backward's elementwise pass needs about one channel:
//   grad_x = weight * invstd * (dz - grad_bias / M - xhat * grad_weight / M).
template <typename acc_t>
struct ChannelGrad {
  ChannelNorm<acc_t> norm;
  acc_t invstd;
  acc_t mean_dz; // grad_bias / M
  acc_t mean_dz_xhat; // grad_weight / M
};

template <typename acc_t>
C10_HOST_DEVICE inline ChannelGrad<acc_t> channel_grad(
    const acc_t* mean,
    const acc_t* invstd,
    const acc_t* weight,
    const acc_t* bias,
    const acc_t* grad_weight,
    const acc_t* grad_bias,
    int64_t count,
    int64_t channel) {
  const acc_t n = static_cast<acc_t>(count);
  return {channel_norm(mean, invstd, weight, bias, channel), invstd[channel], grad_bias[channel] / n,
          grad_weight[channel] / n};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t xhat(const ChannelNorm<acc_t>& norm, acc_t invstd, acc_t value) {
  return (value - norm.mean) * invstd;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t grad_x(const ChannelGrad<acc_t>& grad, acc_t value, acc_t grad_out, bool apply_relu) {
  const acc_t dz = grad_z(grad.norm, value, grad_out, apply_relu);
  return grad.norm.scale * (dz - grad.mean_dz - xhat(grad.norm, grad.invstd, value) * grad.mean_dz_xhat);
}

// Memory offset of pixel p (pixels in NHW order) of a [N, C, H, W] tensor,
// relative to its channel. index_t is int32_t where every index fits (the
// CUDA kernels pick it: 64-bit division is several times slower there).
template <typename index_t>
C10_HOST_DEVICE inline int64_t pixel_offset(
    index_t pixel,
    index_t height,
    index_t width,
    int64_t stride_n,
    int64_t stride_h,
    int64_t stride_w) {
  const index_t w = pixel % width;
  const index_t rest = pixel / width;
  const index_t h = rest % height;
  const index_t n = rest / height;
  return static_cast<int64_t>(n) * stride_n + static_cast<int64_t>(h) * stride_h + static_cast<int64_t>(w) * stride_w;
}

// Coordinates of element e when a kernel numbers the elements of a
// [N, C, H, W] tensor in NCHW order, or in NHWC order when channels are
// innermost in memory (so that consecutive threads touch consecutive addresses
// in either layout).
template <typename index_t>
struct Element {
  index_t channel;
  index_t pixel; // NHW order
};

template <typename index_t>
C10_HOST_DEVICE inline Element<index_t> element_of(
    index_t e,
    index_t channels,
    index_t plane,
    bool channels_inner) {
  if (channels_inner) {
    return {e % channels, e / channels};
  }
  const index_t rest = e / plane;
  return {rest % channels, (rest / channels) * plane + e % plane};
}

} // namespace ranet_fast::ops::batch_norm_relu_math
