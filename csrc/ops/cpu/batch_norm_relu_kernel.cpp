// CPU kernels of the batch-norm training ops (batch_norm_relu.cpp).
//
// Reductions (batch_norm_stats, the sums of batch_norm_relu_backward) cut each
// channel's N * H * W values into units whose boundaries depend on the shape
// and the layout only, never on the thread count: when x's channels are
// innermost (channels_last, or a channel slice of it) a unit is a run of
// whole pixel rows (n, h) holding every channel, read with the channels as
// the unit-stride inner loop; otherwise a unit is one (n, c) plane. Threads
// take whole units and write one partial result per unit and channel; the
// partials of a channel are then combined in a fixed order (a pairwise tree),
// so the results are bitwise the same for any number of threads.
//
// Within a unit, statistics use the corrected two-pass formula (a first pass
// for the unit's mean, a second for the sums of deviations from it, while the
// unit is in cache), and units merge with Chan's formula
// (batch_norm_relu_math.h). Plane loops with unit stride keep kLanes
// independent accumulators, which the compiler turns into SIMD lanes and
// which shorten each rounding chain kLanes-fold.
//
// Elementwise passes (the forward, the backward's grad_x) follow the layout
// of the tensor they write: rows with channels innermost, or planes.
// Accumulation is float32 for float16/bfloat16 (at::opmath_type) and the
// tensors' own type otherwise.
#include "../batch_norm_relu.h"
#include "../batch_norm_relu_math.h"
#include "../layout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace ranet_fast::ops {

namespace {

namespace math = batch_norm_relu_math;

// Elements per unit of work (ATen's elementwise grain size).
constexpr int64_t kElementsPerTask = 32768;
constexpr int kLanes = 8;

// Pixel rows (n, h) per unit of a channels-innermost reduction: about
// kElementsPerTask elements, a function of the shape only.
int64_t rows_per_unit(const at::Tensor& x) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, x.size(1) * x.size(3)));
}

// The partials of one channel, combined pairwise in place: neighbours (2i,
// 2i + 1) merge into i, level by level, so the order is fixed and rounding
// grows with log(count) rather than count.
template <typename T, typename Combine>
T combine_pairwise(T* parts, int64_t count, const Combine& combine) {
  while (count > 1) {
    for (int64_t i = 0; i < count / 2; ++i) {
      parts[i] = combine(parts[2 * i], parts[2 * i + 1]);
    }
    if (count % 2 == 1) {
      parts[count / 2] = parts[count - 1];
    }
    count = (count + 1) / 2;
  }
  return parts[0];
}

template <typename acc_t>
acc_t sum_lanes(const acc_t* lanes) {
  acc_t total = acc_t(0);
  for (int k = 0; k < kLanes; ++k) {
    total += lanes[k];
  }
  return total;
}

// ---------------------------------------------------------------------------
// batch_norm_stats
// ---------------------------------------------------------------------------

// partials[c * N + n]: the Moments of plane (n, c).
template <typename scalar_t, typename acc_t>
void plane_moments(const at::Tensor& x, std::vector<math::Moments<acc_t>>& partials) {
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t plane = height * width;
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const Strides4 s = strides_of(x);
  at::parallel_for(0, batch * channels, std::max<int64_t>(1, kElementsPerTask / plane), [&](int64_t first, int64_t last) {
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t n = unit / channels, c = unit % channels;
      const scalar_t* base = in + n * s.n + c * s.c;
      acc_t sum[kLanes] = {};
      for (int64_t h = 0; h < height; ++h) {
        const scalar_t* line = base + h * s.h;
        int64_t w = 0;
        if (s.w == 1) {
          for (; w + kLanes <= width; w += kLanes) {
            for (int k = 0; k < kLanes; ++k) {
              sum[k] += static_cast<acc_t>(line[w + k]);
            }
          }
        }
        for (; w < width; ++w) {
          sum[0] += static_cast<acc_t>(line[w * s.w]);
        }
      }
      const acc_t shift = sum_lanes(sum) / static_cast<acc_t>(plane);
      acc_t s1[kLanes] = {}, s2[kLanes] = {};
      for (int64_t h = 0; h < height; ++h) {
        const scalar_t* line = base + h * s.h;
        int64_t w = 0;
        if (s.w == 1) {
          for (; w + kLanes <= width; w += kLanes) {
            for (int k = 0; k < kLanes; ++k) {
              const acc_t d = static_cast<acc_t>(line[w + k]) - shift;
              s1[k] += d;
              s2[k] += d * d;
            }
          }
        }
        for (; w < width; ++w) {
          const acc_t d = static_cast<acc_t>(line[w * s.w]) - shift;
          s1[0] += d;
          s2[0] += d * d;
        }
      }
      partials[c * batch + n] = math::from_shifted_sums(plane, shift, sum_lanes(s1), sum_lanes(s2));
    }
  });
}

// partials[c * units + u]: the Moments of channel c over the rows of unit u.
template <typename scalar_t, typename acc_t>
void row_moments(const at::Tensor& x, int64_t rows_per, int64_t units, std::vector<math::Moments<acc_t>>& partials) {
  const int64_t channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t rows = x.size(0) * height;
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const Strides4 s = strides_of(x);
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    std::vector<acc_t> sum(channels), s1(channels), s2(channels);
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t row_begin = unit * rows_per, row_end = std::min(rows, row_begin + rows_per);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t row = row_begin; row < row_end; ++row) {
        const scalar_t* line = in + (row / height) * s.n + (row % height) * s.h;
        for (int64_t w = 0; w < width; ++w) {
          const scalar_t* pixel = line + w * s.w;
          for (int64_t c = 0; c < channels; ++c) {
            sum[c] += static_cast<acc_t>(pixel[c]);
          }
        }
      }
      const int64_t count = (row_end - row_begin) * width;
      for (int64_t c = 0; c < channels; ++c) {
        sum[c] /= static_cast<acc_t>(count); // from here on: the shift
      }
      std::fill(s1.begin(), s1.end(), acc_t(0));
      std::fill(s2.begin(), s2.end(), acc_t(0));
      for (int64_t row = row_begin; row < row_end; ++row) {
        const scalar_t* line = in + (row / height) * s.n + (row % height) * s.h;
        for (int64_t w = 0; w < width; ++w) {
          const scalar_t* pixel = line + w * s.w;
          for (int64_t c = 0; c < channels; ++c) {
            const acc_t d = static_cast<acc_t>(pixel[c]) - sum[c];
            s1[c] += d;
            s2[c] += d * d;
          }
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        partials[c * units + unit] = math::from_shifted_sums(count, sum[c], s1[c], s2[c]);
      }
    }
  });
}

void batch_norm_stats_write(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t channels = x.size(1);
    int64_t units = x.size(0);
    std::vector<math::Moments<acc_t>> partials;
    if (channels_inner(x)) {
      const int64_t rows_per = rows_per_unit(x);
      units = (x.size(0) * x.size(2) + rows_per - 1) / rows_per;
      partials.resize(channels * units);
      row_moments<scalar_t, acc_t>(x, rows_per, units, partials);
    } else {
      partials.resize(channels * units);
      plane_moments<scalar_t, acc_t>(x, partials);
    }
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* var_data = var.mutable_data_ptr<acc_t>();
    at::parallel_for(0, channels, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const math::Moments<acc_t> total = combine_pairwise(
            partials.data() + c * units, units, math::merge<acc_t>);
        mean_data[c] = total.mean;
        var_data[c] = total.m2 / static_cast<acc_t>(total.count);
      }
    });
  });
}

// ---------------------------------------------------------------------------
// batch_norm_relu{,_out}
// ---------------------------------------------------------------------------

template <typename acc_t>
math::ChannelNorm<acc_t> channel_norm(const BatchNormParams& params, int64_t c) {
  return math::channel_norm(
      params.mean.const_data_ptr<acc_t>(), params.invstd.const_data_ptr<acc_t>(),
      params.weight.const_data_ptr<acc_t>(), params.bias.const_data_ptr<acc_t>(), c);
}

template <typename acc_t>
std::vector<math::ChannelNorm<acc_t>> channel_norms(const BatchNormParams& params) {
  std::vector<math::ChannelNorm<acc_t>> norms(params.mean.size(0));
  for (int64_t c = 0; c < params.mean.size(0); ++c) {
    norms[c] = channel_norm<acc_t>(params, c);
  }
  return norms;
}

// dst = act(normalize(src)) over src's [N, C, H, W]; dst is out's channel slice
// or a new tensor. Loops follow dst's layout.
void batch_norm_relu_write(const at::Tensor& dst, const at::Tensor& src, const BatchNormParams& params, bool relu) {
  if (src.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "batch_norm_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<math::ChannelNorm<acc_t>> norms = channel_norms<acc_t>(params);
    const math::ChannelNorm<acc_t>* norm = norms.data();
    const int64_t batch = src.size(0), channels = src.size(1), height = src.size(2), width = src.size(3);
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* out = dst.mutable_data_ptr<scalar_t>();
    const Strides4 si = strides_of(src), so = strides_of(dst);
    if (channels_inner(dst)) {
      const int64_t row = width * channels;
      at::parallel_for(0, batch * height, std::max<int64_t>(1, kElementsPerTask / row), [&](int64_t first, int64_t last) {
        for (int64_t unit = first; unit < last; ++unit) {
          const int64_t n = unit / height, h = unit % height;
          for (int64_t w = 0; w < width; ++w) {
            const scalar_t* in_pixel = in + n * si.n + h * si.h + w * si.w;
            scalar_t* out_pixel = out + n * so.n + h * so.h + w * so.w;
            if (si.c == 1) { // unit stride on both sides
              for (int64_t c = 0; c < channels; ++c) {
                out_pixel[c] = static_cast<scalar_t>(math::forward(norm[c], static_cast<acc_t>(in_pixel[c]), relu));
              }
            } else {
              for (int64_t c = 0; c < channels; ++c) {
                out_pixel[c] =
                    static_cast<scalar_t>(math::forward(norm[c], static_cast<acc_t>(in_pixel[c * si.c]), relu));
              }
            }
          }
        }
      });
      return;
    }
    const int64_t plane = height * width;
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, kElementsPerTask / plane), [&](int64_t first, int64_t last) {
      for (int64_t unit = first; unit < last; ++unit) {
        const int64_t n = unit / channels, c = unit % channels;
        const math::ChannelNorm<acc_t> channel_norm = norm[c];
        for (int64_t h = 0; h < height; ++h) {
          const scalar_t* in_line = in + n * si.n + c * si.c + h * si.h;
          scalar_t* out_line = out + n * so.n + c * so.c + h * so.h;
          if (si.w == 1 && so.w == 1) { // unit stride on both sides
            for (int64_t w = 0; w < width; ++w) {
              out_line[w] = static_cast<scalar_t>(math::forward(channel_norm, static_cast<acc_t>(in_line[w]), relu));
            }
          } else {
            for (int64_t w = 0; w < width; ++w) {
              out_line[w * so.w] =
                  static_cast<scalar_t>(math::forward(channel_norm, static_cast<acc_t>(in_line[w * si.w]), relu));
            }
          }
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------
// batch_norm_relu_backward
// ---------------------------------------------------------------------------

// Per channel and unit: the sums of dz and of dz * xhat.
template <typename acc_t>
struct GradSums {
  acc_t dz;
  acc_t dz_xhat;
};

template <typename acc_t>
GradSums<acc_t> add_sums(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  return {a.dz + b.dz, a.dz_xhat + b.dz_xhat};
}

// The sums of dz and of dz * xhat over one unit-stride line, added into the lanes. A function of
// its own on plain pointers with ReLU as a template argument and register lanes: written inline
// in the parallel loop with a runtime flag and the caller's lanes, or inlined there, GCC emitted
// scalar code with a branch per element (7x slower), hence also noinline.
template <typename scalar_t, typename acc_t, bool kRelu>
__attribute__((noinline)) void line_grad_sums(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ grad,
    int64_t width,
    const math::ChannelGrad<acc_t> channel,
    acc_t* __restrict__ dz_sum,
    acc_t* __restrict__ dz_xhat_sum) {
  // Local lanes (kept in registers) for the vector loop; the caller's are added to at the end.
  acc_t dz_lanes[kLanes] = {}, dz_xhat_lanes[kLanes] = {};
  int64_t w = 0;
  for (; w + kLanes <= width; w += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t value = static_cast<acc_t>(x[w + k]);
      const acc_t dz = math::grad_z(channel.norm, value, static_cast<acc_t>(grad[w + k]), kRelu);
      dz_lanes[k] += dz;
      dz_xhat_lanes[k] += dz * math::xhat(channel.norm, channel.invstd, value);
    }
  }
  for (; w < width; ++w) {
    const acc_t value = static_cast<acc_t>(x[w]);
    const acc_t dz = math::grad_z(channel.norm, value, static_cast<acc_t>(grad[w]), kRelu);
    dz_lanes[0] += dz;
    dz_xhat_lanes[0] += dz * math::xhat(channel.norm, channel.invstd, value);
  }
  for (int k = 0; k < kLanes; ++k) {
    dz_sum[k] += dz_lanes[k];
    dz_xhat_sum[k] += dz_xhat_lanes[k];
  }
}

// grad_x over one unit-stride line (see line_grad_sums for why a function of its own).
template <typename scalar_t, typename acc_t, bool kRelu>
__attribute__((noinline)) void line_grad_x(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ grad,
    scalar_t* __restrict__ out,
    int64_t width,
    const math::ChannelGrad<acc_t> channel) {
  for (int64_t w = 0; w < width; ++w) {
    out[w] = static_cast<scalar_t>(
        math::grad_x(channel, static_cast<acc_t>(x[w]), static_cast<acc_t>(grad[w]), kRelu));
  }
}

// partials[c * N + n]: the sums over plane (n, c).
template <typename scalar_t, typename acc_t>
void plane_grad_sums(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const math::ChannelGrad<acc_t>* grads,
    bool relu,
    std::vector<GradSums<acc_t>>& partials) {
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const Strides4 sx = strides_of(x), sg = strides_of(grad_out);
  // A plane dense on both sides is one line: RANet's planes are 7x7 to 56x56, and a call per
  // short row would cost more than the row.
  const bool dense_planes = sx.w == 1 && sg.w == 1 && sx.h == width && sg.h == width;
  const int64_t line_length = dense_planes ? height * width : width, lines = dense_planes ? 1 : height;
  at::parallel_for(0, batch * channels, std::max<int64_t>(1, kElementsPerTask / (height * width)),
                   [&](int64_t first, int64_t last) {
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t n = unit / channels, c = unit % channels;
      const math::ChannelGrad<acc_t> channel = grads[c];
      acc_t dz_sum[kLanes] = {}, dz_xhat_sum[kLanes] = {};
      for (int64_t h = 0; h < lines; ++h) {
        const scalar_t* x_line = in + n * sx.n + c * sx.c + h * sx.h;
        const scalar_t* grad_line = grad + n * sg.n + c * sg.c + h * sg.h;
        int64_t w = 0;
        if (sx.w == 1 && sg.w == 1) {
          if (relu) {
            line_grad_sums<scalar_t, acc_t, true>(x_line, grad_line, line_length, channel, dz_sum, dz_xhat_sum);
          } else {
            line_grad_sums<scalar_t, acc_t, false>(x_line, grad_line, line_length, channel, dz_sum, dz_xhat_sum);
          }
          w = line_length;
        }
        for (; w < width; ++w) {
          const acc_t value = static_cast<acc_t>(x_line[w * sx.w]);
          const acc_t dz = math::grad_z(channel.norm, value, static_cast<acc_t>(grad_line[w * sg.w]), relu);
          dz_sum[0] += dz;
          dz_xhat_sum[0] += dz * math::xhat(channel.norm, channel.invstd, value);
        }
      }
      partials[c * batch + n] = {sum_lanes(dz_sum), sum_lanes(dz_xhat_sum)};
    }
  });
}

// partials[c * units + u]: the sums of channel c over the rows of unit u.
template <typename scalar_t, typename acc_t>
void row_grad_sums(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const math::ChannelGrad<acc_t>* grads,
    bool relu,
    int64_t rows_per,
    int64_t units,
    std::vector<GradSums<acc_t>>& partials) {
  const int64_t channels = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t rows = x.size(0) * height;
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const Strides4 sx = strides_of(x), sg = strides_of(grad_out);
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    std::vector<acc_t> dz_sum(channels), dz_xhat_sum(channels);
    for (int64_t unit = first; unit < last; ++unit) {
      std::fill(dz_sum.begin(), dz_sum.end(), acc_t(0));
      std::fill(dz_xhat_sum.begin(), dz_xhat_sum.end(), acc_t(0));
      const int64_t row_begin = unit * rows_per, row_end = std::min(rows, row_begin + rows_per);
      for (int64_t row = row_begin; row < row_end; ++row) {
        const int64_t n = row / height, h = row % height;
        for (int64_t w = 0; w < width; ++w) {
          const scalar_t* x_pixel = in + n * sx.n + h * sx.h + w * sx.w;
          const scalar_t* grad_pixel = grad + n * sg.n + h * sg.h + w * sg.w;
          for (int64_t c = 0; c < channels; ++c) {
            const acc_t value = static_cast<acc_t>(x_pixel[c]);
            const acc_t dz = math::grad_z(grads[c].norm, value, static_cast<acc_t>(grad_pixel[c * sg.c]), relu);
            dz_sum[c] += dz;
            dz_xhat_sum[c] += dz * math::xhat(grads[c].norm, grads[c].invstd, value);
          }
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        partials[c * units + unit] = {dz_sum[c], dz_xhat_sum[c]};
      }
    }
  });
}

// grad_x = weight * invstd * (dz - grad_bias / M - xhat * grad_weight / M);
// loops follow grad_x's layout (x's).
template <typename scalar_t, typename acc_t>
void write_grad_x(
    const at::Tensor& grad_x,
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const math::ChannelGrad<acc_t>* grads,
    bool relu) {
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
  const Strides4 sx = strides_of(x), sg = strides_of(grad_out), so = strides_of(grad_x);
  if (channels_inner(grad_x)) {
    at::parallel_for(0, batch * height, std::max<int64_t>(1, kElementsPerTask / (width * channels)),
                     [&](int64_t first, int64_t last) {
      for (int64_t unit = first; unit < last; ++unit) {
        const int64_t n = unit / height, h = unit % height;
        for (int64_t w = 0; w < width; ++w) {
          const scalar_t* x_pixel = in + n * sx.n + h * sx.h + w * sx.w;
          const scalar_t* grad_pixel = grad + n * sg.n + h * sg.h + w * sg.w;
          scalar_t* out_pixel = out + n * so.n + h * so.h + w * so.w;
          for (int64_t c = 0; c < channels; ++c) {
            out_pixel[c] = static_cast<scalar_t>(math::grad_x(
                grads[c], static_cast<acc_t>(x_pixel[c * sx.c]), static_cast<acc_t>(grad_pixel[c * sg.c]), relu));
          }
        }
      }
    });
    return;
  }
  // Dense planes as one line, as in plane_grad_sums.
  const bool dense_planes =
      sx.w == 1 && sg.w == 1 && so.w == 1 && sx.h == width && sg.h == width && so.h == width;
  const int64_t line_length = dense_planes ? height * width : width, lines = dense_planes ? 1 : height;
  at::parallel_for(0, batch * channels, std::max<int64_t>(1, kElementsPerTask / (height * width)),
                   [&](int64_t first, int64_t last) {
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t n = unit / channels, c = unit % channels;
      const math::ChannelGrad<acc_t> channel = grads[c];
      for (int64_t h = 0; h < lines; ++h) {
        const scalar_t* x_line = in + n * sx.n + c * sx.c + h * sx.h;
        const scalar_t* grad_line = grad + n * sg.n + c * sg.c + h * sg.h;
        scalar_t* out_line = out + n * so.n + c * so.c + h * so.h;
        if (sx.w == 1 && sg.w == 1 && so.w == 1) { // unit stride everywhere
          if (relu) {
            line_grad_x<scalar_t, acc_t, true>(x_line, grad_line, out_line, line_length, channel);
          } else {
            line_grad_x<scalar_t, acc_t, false>(x_line, grad_line, out_line, line_length, channel);
          }
        } else {
          for (int64_t w = 0; w < width; ++w) {
            out_line[w * so.w] = static_cast<scalar_t>(math::grad_x(
                channel, static_cast<acc_t>(x_line[w * sx.w]), static_cast<acc_t>(grad_line[w * sg.w]), relu));
          }
        }
      }
    }
  });
}

void batch_norm_relu_write_gradients(const at::Tensor& grad_out, const at::Tensor& x, const BatchNormParams& params,
                                     bool relu, const BatchNormReluGradients& gradients) {
  const int64_t count = x.size(0) * x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t channels = x.size(1);
    const acc_t* invstd = params.invstd.const_data_ptr<acc_t>();
    acc_t* grad_weight_data = gradients.grad_weight.mutable_data_ptr<acc_t>();
    acc_t* grad_bias_data = gradients.grad_bias.mutable_data_ptr<acc_t>();
    // The reductions read only the ChannelNorm and invstd of each channel; the
    // mean gradients are filled in once the sums are known.
    std::vector<math::ChannelGrad<acc_t>> grads(channels);
    for (int64_t c = 0; c < channels; ++c) {
      grads[c] = {channel_norm<acc_t>(params, c), invstd[c], acc_t(0), acc_t(0)};
    }
    int64_t units = x.size(0);
    std::vector<GradSums<acc_t>> partials;
    if (channels_inner(x)) {
      const int64_t rows_per = rows_per_unit(x);
      units = (x.size(0) * x.size(2) + rows_per - 1) / rows_per;
      partials.resize(channels * units);
      row_grad_sums<scalar_t, acc_t>(grad_out, x, grads.data(), relu, rows_per, units, partials);
    } else {
      partials.resize(channels * units);
      plane_grad_sums<scalar_t, acc_t>(grad_out, x, grads.data(), relu, partials);
    }
    for (int64_t c = 0; c < channels; ++c) {
      const GradSums<acc_t> total = combine_pairwise(partials.data() + c * units, units, add_sums<acc_t>);
      grad_bias_data[c] = total.dz;
      grad_weight_data[c] = total.dz_xhat;
      grads[c] = math::channel_grad(params.mean.const_data_ptr<acc_t>(), invstd, params.weight.const_data_ptr<acc_t>(),
                                    params.bias.const_data_ptr<acc_t>(), grad_weight_data, grad_bias_data, count, c);
    }
    write_grad_x<scalar_t, acc_t>(gradients.grad_x, grad_out, x, grads.data(), relu);
  });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  register_batch_norm_kernels<batch_norm_stats_write, batch_norm_relu_write, batch_norm_relu_write_gradients>(m);
}

} // namespace ranet_fast::ops
