// Per-element arithmetic of upsample_concat, shared by the CPU and CUDA
// kernels.
//
// A part p of shape [C, in_h, in_w] (per sample) is resized to [C, out_h,
// out_w] exactly like F.interpolate(mode="bilinear", align_corners=True):
// along each axis an output index d reads the two input indices i0, i1 with
// weights l0, l1 (see linear_taps), and the 2-D value is the separable
// product of the row and column taps. Parts whose size already equals the
// target are copied instead (see resize_is_identity): the interpolation
// formula would give the same finite numbers, but 0 * inf = NaN would leak a
// neighbour's infinity into the copy.
//
// The CUDA backward is written in gather form: the gradient of input element i
// along an axis sums the output gradients of every d whose taps touch i.
// candidate_range gives a superset of those d from the scale; the caller
// recomputes the forward's taps for each candidate (tap_weight), so the set
// and the weights are exactly the forward's and no atomics are needed. The CPU
// backward instead has one thread own whole gradient planes and scatter into
// them sequentially with the forward's taps (linear_taps), which is equally
// deterministic (see csrc/ops/cpu/upsample_concat_kernel.cpp).
//
// C10_HOST_DEVICE expands to `__host__ __device__` under nvcc and to nothing
// in a host-only (CppExtension) build.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace ranet_fast::ops::upsample_concat_math {

// Indices and weights with which output index d reads its input axis.
template <typename acc_t>
struct LinearTaps {
  int64_t i0;
  int64_t i1;
  acc_t l0;
  acc_t l1;
};

// torch's area_pixel_compute_scale with align_corners=True, in acc_t.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t source_scale(int64_t in_size, int64_t out_size) {
  return out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1)
                      : acc_t(0);
}

// torch's upsample_bilinear2d index and weight arithmetic (align_corners=True).
template <typename acc_t>
C10_HOST_DEVICE inline LinearTaps<acc_t> linear_taps(
    acc_t scale,
    int64_t dst_index,
    int64_t in_size) {
  const acc_t source = scale * static_cast<acc_t>(dst_index);
  LinearTaps<acc_t> taps;
  taps.i0 = static_cast<int64_t>(source);
  // Along an axis whose size does not change (scale exactly 1) both taps read the same element,
  // as CPU eager does: a zero-weight neighbour would turn its inf/NaN into a NaN here
  // (0 * inf), which eager does not produce.
  taps.i1 = taps.i0 + (taps.i0 < in_size - 1 && scale != acc_t(1) ? 1 : 0);
  taps.l1 = source - static_cast<acc_t>(taps.i0);
  taps.l0 = acc_t(1) - taps.l1;
  return taps;
}

// Weight with which output index d (whose taps are `taps`) reads input index
// i: both taps may land on the same index (at the last input element, or when
// in_size == 1), in which case their weights add up, as they do in the
// forward's sum.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t tap_weight(const LinearTaps<acc_t>& taps, int64_t input_index) {
  return (taps.i0 == input_index ? taps.l0 : acc_t(0)) +
      (taps.i1 == input_index ? taps.l1 : acc_t(0));
}

// Half-open range [first, last) of output indices that may read input index
// i: a superset of {d : i0(d) == i or i1(d) == i}. With a positive scale,
// i0(d) = floor(scale * d) must be i - 1 or i, so scale * d lies in
// [i - 1, i + 1); one index of margin on each side absorbs the rounding of
// the divisions. A zero scale (out_size == 1 or in_size == 1) makes every
// output read index 0 (and 1 with weight 0), so all outputs are candidates.
struct CandidateRange {
  int64_t first;
  int64_t last;
};

template <typename acc_t>
C10_HOST_DEVICE inline CandidateRange candidate_range(
    acc_t scale,
    int64_t input_index,
    int64_t out_size) {
  if (!(scale > acc_t(0))) {
    return {0, out_size};
  }
  int64_t first = static_cast<int64_t>(static_cast<acc_t>(input_index - 1) / scale) - 1;
  int64_t last = static_cast<int64_t>(static_cast<acc_t>(input_index + 1) / scale) + 2;
  first = first < 0 ? 0 : first;
  last = last > out_size ? out_size : last;
  return {first, last};
}

C10_HOST_DEVICE inline bool resize_is_identity(
    int64_t in_h,
    int64_t in_w,
    int64_t out_h,
    int64_t out_w) {
  return in_h == out_h && in_w == out_w;
}

// One resized value: `plane` points at element (n, c, 0, 0) of the part.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t bilinear_value(
    const scalar_t* plane,
    int64_t stride_h,
    int64_t stride_w,
    const LinearTaps<acc_t>& row,
    const LinearTaps<acc_t>& column) {
  const acc_t top = column.l0 * static_cast<acc_t>(plane[row.i0 * stride_h + column.i0 * stride_w]) +
      column.l1 * static_cast<acc_t>(plane[row.i0 * stride_h + column.i1 * stride_w]);
  const acc_t bottom = column.l0 * static_cast<acc_t>(plane[row.i1 * stride_h + column.i0 * stride_w]) +
      column.l1 * static_cast<acc_t>(plane[row.i1 * stride_h + column.i1 * stride_w]);
  return row.l0 * top + row.l1 * bottom;
}

// Gradient of input element (y, x) of one plane of a resized part, gathered
// from `grad_plane`, which points at element (n, channel_offset + c, 0, 0) of
// the output gradient.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t bilinear_input_gradient(
    const scalar_t* grad_plane,
    int64_t stride_h,
    int64_t stride_w,
    int64_t y,
    int64_t x,
    int64_t in_h,
    int64_t in_w,
    int64_t out_h,
    int64_t out_w,
    acc_t scale_h,
    acc_t scale_w) {
  const CandidateRange rows = candidate_range(scale_h, y, out_h);
  const CandidateRange columns = candidate_range(scale_w, x, out_w);
  acc_t total = acc_t(0);
  for (int64_t h = rows.first; h < rows.last; ++h) {
    const acc_t row_weight = tap_weight(linear_taps(scale_h, h, in_h), y);
    if (row_weight == acc_t(0)) {
      continue;
    }
    acc_t row_total = acc_t(0);
    for (int64_t w = columns.first; w < columns.last; ++w) {
      const acc_t column_weight = tap_weight(linear_taps(scale_w, w, in_w), x);
      if (column_weight != acc_t(0)) {
        row_total += column_weight * static_cast<acc_t>(grad_plane[h * stride_h + w * stride_w]);
      }
    }
    total += row_weight * row_total;
  }
  return total;
}

} // namespace ranet_fast::ops::upsample_concat_math
