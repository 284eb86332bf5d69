// CPU kernels of ranet_fast::upsample_concat{,_out,_backward}.
//
// Work is split into independent units over all parts together, described by
// plain descriptors (pointers, sizes, strides, precomputed taps) so that the
// loops touch no at::Tensor. One at::parallel_for covers the units of every
// part, so small parts do not each pay a parallel region:
//
// - planar layouts (the output's channel stride is not its smallest): one unit
//   = one (part, n, c) plane. Identity parts are copied as one memcpy per plane
//   (or per row) when the strides allow it; resized parts use per-part
//   column taps and per-part row taps computed once by math::linear_taps, so
//   the inner loop over output columns is a plain multiply-add over arrays.
// - channels-innermost layouts (channels_last): one unit = one (part, n, h)
//   output row, iterating output columns and then channels innermost.
//
// The backward is deterministic without atomics: a unit owns whole gradient
// planes ((part, n, c) for planar layouts, (part, n) with all its channels for
// channels-innermost ones) and is the only writer of them. Within its planes it
// scatters each output-gradient element onto the (at most four) input elements
// whose forward taps read it, sequentially in a fixed order (output rows, then
// columns), accumulating in acc_t in a thread-local scratch buffer that is then
// written to the gradient. The taps are the forward's (math::linear_taps), so
// each input gradient sums exactly the output gradients that read it, with the
// forward's weights; only the summation order differs from the gather form of
// the CUDA kernel (fp rounding).
#include "../upsample_concat.h"
#include "../upsample_concat_math.h"
#include "../layout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace ranet_fast::ops {

namespace {

namespace math = upsample_concat_math;

// Elements (output elements in the forward, output-gradient elements read in
// the backward) per parallel task (ATen's elementwise grain size).
constexpr int64_t kElementsPerTask = 32768;

// Taps of every output index along one axis, as structure-of-arrays.
template <typename acc_t>
struct AxisTaps {
  std::vector<int64_t> i0;
  std::vector<int64_t> i1;
  std::vector<acc_t> l0;
  std::vector<acc_t> l1;

  AxisTaps(int64_t in_size, int64_t out_size) {
    const acc_t scale = math::source_scale<acc_t>(in_size, out_size);
    i0.resize(out_size);
    i1.resize(out_size);
    l0.resize(out_size);
    l1.resize(out_size);
    for (int64_t d = 0; d < out_size; ++d) {
      const math::LinearTaps<acc_t> taps = math::linear_taps(scale, d, in_size);
      i0[d] = taps.i0;
      i1[d] = taps.i1;
      l0[d] = taps.l0;
      l1[d] = taps.l1;
    }
  }

  math::LinearTaps<acc_t> at(int64_t d) const {
    return {i0[d], i1[d], l0[d], l1[d]};
  }
};

// One part as the loops see it: the part (or its gradient) and its slice of
// the output (or of the output gradient).
template <typename scalar_t, typename acc_t>
struct PartView {
  scalar_t* data; // part (forward: read) or part gradient (backward: written)
  int64_t channels, in_h, in_w;
  int64_t stride_n, stride_c, stride_h, stride_w;
  int64_t channel_offset;
  bool identity;
  AxisTaps<acc_t> rows;
  AxisTaps<acc_t> columns;
};

template <typename scalar_t, typename acc_t>
std::vector<PartView<scalar_t, acc_t>> part_views(
    const std::vector<at::Tensor>& tensors,
    at::IntArrayRef channel_offsets,
    int64_t out_h,
    int64_t out_w) {
  std::vector<PartView<scalar_t, acc_t>> views;
  views.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    views.push_back(PartView<scalar_t, acc_t>{
        const_cast<scalar_t*>(t.const_data_ptr<scalar_t>()),
        t.size(1),
        t.size(2),
        t.size(3),
        t.stride(0),
        t.stride(1),
        t.stride(2),
        t.stride(3),
        channel_offsets[i],
        math::resize_is_identity(t.size(2), t.size(3), out_h, out_w),
        AxisTaps<acc_t>(t.size(2), out_h),
        AxisTaps<acc_t>(t.size(3), out_w)});
  }
  return views;
}

// Channels innermost: the channel stride is the smallest of the per-sample
// strides (channels_last), so a unit iterates channels in its inner loop.
bool channels_innermost(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) < t.stride(3) && t.stride(1) < t.stride(2);
}

// Runs fn(part, unit_in_part) over units [begin, end) of the concatenation of
// the parts' unit ranges (unit_starts = prefix sums, back() = total).
template <typename Fn>
void for_units(const std::vector<int64_t>& unit_starts, int64_t begin, int64_t end, const Fn& fn) {
  size_t i = static_cast<size_t>(
      std::upper_bound(unit_starts.begin(), unit_starts.end(), begin) - unit_starts.begin() - 1);
  for (int64_t unit = begin; unit < end; ++unit) {
    while (unit >= unit_starts[i + 1]) {
      ++i;
    }
    fn(i, unit - unit_starts[i]);
  }
}

int64_t grain_for(int64_t elements_per_unit) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_unit));
}

// ---------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t>
void forward_plane(
    const PartView<scalar_t, acc_t>& p,
    const scalar_t* plane,
    scalar_t* out_plane,
    int64_t out_h,
    int64_t out_w,
    int64_t out_sh,
    int64_t out_sw) {
  if (p.identity) {
    if (p.stride_w == 1 && out_sw == 1) {
      if (p.stride_h == out_w && out_sh == out_w) {
        std::memcpy(out_plane, plane, sizeof(scalar_t) * out_h * out_w);
      } else {
        for (int64_t h = 0; h < out_h; ++h) {
          std::memcpy(out_plane + h * out_sh, plane + h * p.stride_h, sizeof(scalar_t) * out_w);
        }
      }
    } else {
      for (int64_t h = 0; h < out_h; ++h) {
        for (int64_t w = 0; w < out_w; ++w) {
          out_plane[h * out_sh + w * out_sw] = plane[h * p.stride_h + w * p.stride_w];
        }
      }
    }
    return;
  }
  const int64_t* c0 = p.columns.i0.data();
  const int64_t* c1 = p.columns.i1.data();
  const acc_t* cl0 = p.columns.l0.data();
  const acc_t* cl1 = p.columns.l1.data();
  const int64_t sw = p.stride_w;
  for (int64_t h = 0; h < out_h; ++h) {
    const math::LinearTaps<acc_t> row = p.rows.at(h);
    const scalar_t* top = plane + row.i0 * p.stride_h;
    const scalar_t* bottom = plane + row.i1 * p.stride_h;
    scalar_t* out_row = out_plane + h * out_sh;
    // The expression of math::bilinear_value, with the row offsets hoisted.
    if (out_sw == 1) {
      for (int64_t w = 0; w < out_w; ++w) {
        const acc_t t = cl0[w] * static_cast<acc_t>(top[c0[w] * sw]) +
            cl1[w] * static_cast<acc_t>(top[c1[w] * sw]);
        const acc_t b = cl0[w] * static_cast<acc_t>(bottom[c0[w] * sw]) +
            cl1[w] * static_cast<acc_t>(bottom[c1[w] * sw]);
        out_row[w] = static_cast<scalar_t>(row.l0 * t + row.l1 * b);
      }
    } else {
      for (int64_t w = 0; w < out_w; ++w) {
        const acc_t t = cl0[w] * static_cast<acc_t>(top[c0[w] * sw]) +
            cl1[w] * static_cast<acc_t>(top[c1[w] * sw]);
        const acc_t b = cl0[w] * static_cast<acc_t>(bottom[c0[w] * sw]) +
            cl1[w] * static_cast<acc_t>(bottom[c1[w] * sw]);
        out_row[w * out_sw] = static_cast<scalar_t>(row.l0 * t + row.l1 * b);
      }
    }
  }
}

// One output row (n, h) of a part, all its channels, channels innermost.
template <typename scalar_t, typename acc_t>
void forward_row_channels_inner(
    const PartView<scalar_t, acc_t>& p,
    const scalar_t* sample,
    scalar_t* out_row,
    int64_t h,
    int64_t out_w,
    int64_t out_sc,
    int64_t out_sw) {
  const int64_t channels = p.channels;
  const int64_t sc = p.stride_c;
  if (p.identity) {
    const scalar_t* in_row = sample + h * p.stride_h;
    for (int64_t w = 0; w < out_w; ++w) {
      const scalar_t* src = in_row + w * p.stride_w;
      scalar_t* dst = out_row + w * out_sw;
      if (sc == 1 && out_sc == 1) {
        std::memcpy(dst, src, sizeof(scalar_t) * channels);
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          dst[c * out_sc] = src[c * sc];
        }
      }
    }
    return;
  }
  const math::LinearTaps<acc_t> row = p.rows.at(h);
  const scalar_t* top = sample + row.i0 * p.stride_h;
  const scalar_t* bottom = sample + row.i1 * p.stride_h;
  for (int64_t w = 0; w < out_w; ++w) {
    const math::LinearTaps<acc_t> column = p.columns.at(w);
    const scalar_t* t0 = top + column.i0 * p.stride_w;
    const scalar_t* t1 = top + column.i1 * p.stride_w;
    const scalar_t* b0 = bottom + column.i0 * p.stride_w;
    const scalar_t* b1 = bottom + column.i1 * p.stride_w;
    scalar_t* dst = out_row + w * out_sw;
    if (sc == 1 && out_sc == 1) {
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t t = column.l0 * static_cast<acc_t>(t0[c]) + column.l1 * static_cast<acc_t>(t1[c]);
        const acc_t b = column.l0 * static_cast<acc_t>(b0[c]) + column.l1 * static_cast<acc_t>(b1[c]);
        dst[c] = static_cast<scalar_t>(row.l0 * t + row.l1 * b);
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t t = column.l0 * static_cast<acc_t>(t0[c * sc]) +
            column.l1 * static_cast<acc_t>(t1[c * sc]);
        const acc_t b = column.l0 * static_cast<acc_t>(b0[c * sc]) +
            column.l1 * static_cast<acc_t>(b1[c * sc]);
        dst[c * out_sc] = static_cast<scalar_t>(row.l0 * t + row.l1 * b);
      }
    }
  }
}

template <typename scalar_t>
void forward_parts(
    const at::Tensor& out,
    at::TensorList parts,
    at::IntArrayRef channel_offsets) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = out.size(0);
  const int64_t out_h = out.size(2);
  const int64_t out_w = out.size(3);
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const Strides4 os = strides_of(out);
  const std::vector<at::Tensor> part_list(parts.begin(), parts.end());
  const auto views = part_views<scalar_t, acc_t>(part_list, channel_offsets, out_h, out_w);

  std::vector<int64_t> unit_starts{0};
  if (channels_innermost(out)) {
    int64_t elements = 0;
    for (const auto& p : views) {
      unit_starts.push_back(unit_starts.back() + batch * out_h);
      elements += batch * out_h * out_w * p.channels;
    }
    const int64_t per_unit = elements / std::max<int64_t>(1, unit_starts.back());
    at::parallel_for(0, unit_starts.back(), grain_for(per_unit), [&](int64_t begin, int64_t end) {
      for_units(unit_starts, begin, end, [&](size_t i, int64_t local) {
        const auto& p = views[i];
        const int64_t h = local % out_h;
        const int64_t n = local / out_h;
        forward_row_channels_inner(
            p,
            p.data + n * p.stride_n,
            out_data + n * os.n + p.channel_offset * os.c + h * os.h,
            h,
            out_w,
            os.c,
            os.w);
      });
    });
    return;
  }
  for (const auto& p : views) {
    unit_starts.push_back(unit_starts.back() + batch * p.channels);
  }
  at::parallel_for(0, unit_starts.back(), grain_for(out_h * out_w), [&](int64_t begin, int64_t end) {
    for_units(unit_starts, begin, end, [&](size_t i, int64_t local) {
      const auto& p = views[i];
      const int64_t c = local % p.channels;
      const int64_t n = local / p.channels;
      forward_plane(
          p,
          p.data + n * p.stride_n + c * p.stride_c,
          out_data + n * os.n + (p.channel_offset + c) * os.c,
          out_h,
          out_w,
          os.h,
          os.w);
    });
  });
}

void upsample_concat_write(const at::Tensor& out, at::TensorList parts, at::IntArrayRef channel_offsets) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "upsample_concat_cpu", [&] {
        forward_parts<scalar_t>(out, parts, channel_offsets);
      });
}

// --------------------------------------------------------------- backward

// Gradient of one (n, c) plane of a part (planar layouts). `scratch` holds
// in_h * in_w accumulators.
template <typename scalar_t, typename acc_t>
void backward_plane(
    const PartView<scalar_t, acc_t>& p,
    scalar_t* gradient_plane,
    const scalar_t* grad_plane,
    int64_t out_h,
    int64_t out_w,
    int64_t grad_sh,
    int64_t grad_sw,
    std::vector<acc_t>& scratch,
    std::vector<acc_t>& row_scratch) {
  const int64_t in_h = p.in_h;
  const int64_t in_w = p.in_w;
  if (p.identity) {
    if (p.stride_w == 1 && grad_sw == 1) {
      if (p.stride_h == in_w && grad_sh == in_w) {
        std::memcpy(gradient_plane, grad_plane, sizeof(scalar_t) * in_h * in_w);
      } else {
        for (int64_t y = 0; y < in_h; ++y) {
          std::memcpy(gradient_plane + y * p.stride_h, grad_plane + y * grad_sh, sizeof(scalar_t) * in_w);
        }
      }
    } else {
      for (int64_t y = 0; y < in_h; ++y) {
        for (int64_t x = 0; x < in_w; ++x) {
          gradient_plane[y * p.stride_h + x * p.stride_w] = grad_plane[y * grad_sh + x * grad_sw];
        }
      }
    }
    return;
  }
  acc_t* total = scratch.data();
  acc_t* row_total = row_scratch.data();
  std::fill(total, total + in_h * in_w, acc_t(0));
  const int64_t* c0 = p.columns.i0.data();
  const int64_t* c1 = p.columns.i1.data();
  const acc_t* cl0 = p.columns.l0.data();
  const acc_t* cl1 = p.columns.l1.data();
  for (int64_t h = 0; h < out_h; ++h) {
    // Transpose of the column pass: output row h onto an input-width row.
    std::fill(row_total, row_total + in_w, acc_t(0));
    const scalar_t* grad_row = grad_plane + h * grad_sh;
    for (int64_t w = 0; w < out_w; ++w) {
      const acc_t g = static_cast<acc_t>(grad_row[w * grad_sw]);
      row_total[c0[w]] += cl0[w] * g;
      row_total[c1[w]] += cl1[w] * g;
    }
    // Transpose of the row pass: onto the two input rows it read.
    const math::LinearTaps<acc_t> row = p.rows.at(h);
    acc_t* top = total + row.i0 * in_w;
    for (int64_t x = 0; x < in_w; ++x) {
      top[x] += row.l0 * row_total[x];
    }
    acc_t* bottom = total + row.i1 * in_w;
    for (int64_t x = 0; x < in_w; ++x) {
      bottom[x] += row.l1 * row_total[x];
    }
  }
  for (int64_t y = 0; y < in_h; ++y) {
    for (int64_t x = 0; x < in_w; ++x) {
      gradient_plane[y * p.stride_h + x * p.stride_w] = static_cast<scalar_t>(total[y * in_w + x]);
    }
  }
}

// Gradient of sample n of a part, all channels (channels-innermost layouts).
// `scratch` holds in_h * in_w * channels accumulators, channels innermost.
template <typename scalar_t, typename acc_t>
void backward_sample_channels_inner(
    const PartView<scalar_t, acc_t>& p,
    scalar_t* gradient_sample,
    const scalar_t* grad_sample,
    int64_t out_h,
    int64_t out_w,
    const Strides4& gs,
    std::vector<acc_t>& scratch) {
  const int64_t in_h = p.in_h;
  const int64_t in_w = p.in_w;
  const int64_t channels = p.channels;
  if (p.identity) {
    for (int64_t y = 0; y < in_h; ++y) {
      for (int64_t x = 0; x < in_w; ++x) {
        scalar_t* dst = gradient_sample + y * p.stride_h + x * p.stride_w;
        const scalar_t* src = grad_sample + y * gs.h + x * gs.w;
        if (p.stride_c == 1 && gs.c == 1) {
          std::memcpy(dst, src, sizeof(scalar_t) * channels);
        } else {
          for (int64_t c = 0; c < channels; ++c) {
            dst[c * p.stride_c] = src[c * gs.c];
          }
        }
      }
    }
    return;
  }
  acc_t* total = scratch.data();
  std::fill(total, total + in_h * in_w * channels, acc_t(0));
  for (int64_t h = 0; h < out_h; ++h) {
    const math::LinearTaps<acc_t> row = p.rows.at(h);
    for (int64_t w = 0; w < out_w; ++w) {
      const math::LinearTaps<acc_t> column = p.columns.at(w);
      const scalar_t* g = grad_sample + h * gs.h + w * gs.w;
      const acc_t weights[4] = {
          row.l0 * column.l0, row.l0 * column.l1, row.l1 * column.l0, row.l1 * column.l1};
      acc_t* targets[4] = {
          total + (row.i0 * in_w + column.i0) * channels,
          total + (row.i0 * in_w + column.i1) * channels,
          total + (row.i1 * in_w + column.i0) * channels,
          total + (row.i1 * in_w + column.i1) * channels};
      for (int k = 0; k < 4; ++k) {
        acc_t* target = targets[k];
        const acc_t weight = weights[k];
        if (gs.c == 1) {
          for (int64_t c = 0; c < channels; ++c) {
            target[c] += weight * static_cast<acc_t>(g[c]);
          }
        } else {
          for (int64_t c = 0; c < channels; ++c) {
            target[c] += weight * static_cast<acc_t>(g[c * gs.c]);
          }
        }
      }
    }
  }
  for (int64_t y = 0; y < in_h; ++y) {
    for (int64_t x = 0; x < in_w; ++x) {
      scalar_t* dst = gradient_sample + y * p.stride_h + x * p.stride_w;
      const acc_t* src = total + (y * in_w + x) * channels;
      for (int64_t c = 0; c < channels; ++c) {
        dst[c * p.stride_c] = static_cast<scalar_t>(src[c]);
      }
    }
  }
}

template <typename scalar_t>
void backward_parts(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    const std::vector<at::Tensor>& gradients) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = grad_output.size(0);
  const int64_t out_h = grad_output.size(2);
  const int64_t out_w = grad_output.size(3);
  const scalar_t* grad_data = grad_output.const_data_ptr<scalar_t>();
  const Strides4 gs = strides_of(grad_output);
  const auto views = part_views<scalar_t, acc_t>(gradients, channel_offsets, out_h, out_w);

  std::vector<int64_t> unit_starts{0};
  bool inner = true;
  for (const at::Tensor& gradient : gradients) {
    inner = inner && channels_innermost(gradient);
  }
  if (inner) {
    int64_t scratch_size = 1;
    int64_t elements = 0;
    for (const auto& p : views) {
      unit_starts.push_back(unit_starts.back() + batch);
      scratch_size = std::max(scratch_size, p.in_h * p.in_w * p.channels);
      elements += batch * out_h * out_w * p.channels;
    }
    const int64_t per_unit = elements / std::max<int64_t>(1, unit_starts.back());
    at::parallel_for(0, unit_starts.back(), grain_for(per_unit), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(scratch_size);
      for_units(unit_starts, begin, end, [&](size_t i, int64_t n) {
        const auto& p = views[i];
        backward_sample_channels_inner(
            p,
            p.data + n * p.stride_n,
            grad_data + n * gs.n + p.channel_offset * gs.c,
            out_h,
            out_w,
            gs,
            scratch);
      });
    });
    return;
  }
  int64_t scratch_size = 1;
  int64_t row_scratch_size = 1;
  for (const auto& p : views) {
    unit_starts.push_back(unit_starts.back() + batch * p.channels);
    scratch_size = std::max(scratch_size, p.in_h * p.in_w);
    row_scratch_size = std::max(row_scratch_size, p.in_w);
  }
  at::parallel_for(0, unit_starts.back(), grain_for(out_h * out_w), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size);
    std::vector<acc_t> row_scratch(row_scratch_size);
    for_units(unit_starts, begin, end, [&](size_t i, int64_t local) {
      const auto& p = views[i];
      const int64_t c = local % p.channels;
      const int64_t n = local / p.channels;
      backward_plane(
          p,
          p.data + n * p.stride_n + c * p.stride_c,
          grad_data + n * gs.n + (p.channel_offset + c) * gs.c,
          out_h,
          out_w,
          gs.h,
          gs.w,
          scratch,
          row_scratch);
    });
  });
}

void upsample_concat_write_gradients(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    const std::vector<at::Tensor>& gradients) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "upsample_concat_backward_cpu", [&] {
        backward_parts<scalar_t>(grad_output, channel_offsets, gradients);
      });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  register_upsample_concat_kernels<upsample_concat_write, upsample_concat_write_gradients>(m);
}

} // namespace ranet_fast::ops
