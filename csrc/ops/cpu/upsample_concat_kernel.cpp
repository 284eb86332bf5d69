// CPU kernels of ranet_fast::upsample_concat{,_out,_backward}. The rows of all
// parts (one row = one (n, c, h) line of a part's output slice, or of a part's
// gradient in the backward) form one index space split across threads with a
// single at::parallel_for, so small parts do not each pay a parallel region.
#include "../upsample_concat.h"
#include "../upsample_concat_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace ranet_fast::ops {

namespace {

namespace math = upsample_concat_math;

// Elements per parallel task (ATen's elementwise grain size).
constexpr int64_t kElementsPerTask = 32768;

// Index of the part that owns global row `row`, given the rows' prefix sums
// (row_starts[i] = first row of part i, row_starts.back() = total).
size_t part_of_row(const std::vector<int64_t>& row_starts, int64_t row) {
  return static_cast<size_t>(
      std::upper_bound(row_starts.begin(), row_starts.end(), row) - row_starts.begin() - 1);
}

template <typename scalar_t>
void forward_rows(
    const at::Tensor& out,
    at::TensorList parts,
    at::IntArrayRef channel_offsets) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = out.size(0);
  const int64_t out_h = out.size(2);
  const int64_t out_w = out.size(3);
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();

  std::vector<int64_t> row_starts{0};
  std::vector<std::vector<math::LinearTaps<acc_t>>> column_taps(parts.size());
  std::vector<acc_t> scales_h;
  for (size_t i = 0; i < parts.size(); ++i) {
    row_starts.push_back(row_starts.back() + batch * parts[i].size(1) * out_h);
    const acc_t scale_w = math::source_scale<acc_t>(parts[i].size(3), out_w);
    for (int64_t w = 0; w < out_w; ++w) {
      column_taps[i].push_back(math::linear_taps(scale_w, w, parts[i].size(3)));
    }
    scales_h.push_back(math::source_scale<acc_t>(parts[i].size(2), out_h));
  }
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / out_w);
  at::parallel_for(0, row_starts.back(), rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const size_t i = part_of_row(row_starts, row);
      const at::Tensor& part = parts[i];
      const int64_t channels = part.size(1);
      const int64_t local = row - row_starts[i];
      const int64_t h = local % out_h;
      const int64_t c = (local / out_h) % channels;
      const int64_t n = local / out_h / channels;
      scalar_t* out_row = out_data + n * out.stride(0) +
          (channel_offsets[i] + c) * out.stride(1) + h * out.stride(2);
      const scalar_t* plane =
          part.const_data_ptr<scalar_t>() + n * part.stride(0) + c * part.stride(1);
      if (math::resize_is_identity(part.size(2), part.size(3), out_h, out_w)) {
        for (int64_t w = 0; w < out_w; ++w) {
          out_row[w * out.stride(3)] = plane[h * part.stride(2) + w * part.stride(3)];
        }
        continue;
      }
      const math::LinearTaps<acc_t> row_taps =
          math::linear_taps(scales_h[i], h, part.size(2));
      for (int64_t w = 0; w < out_w; ++w) {
        out_row[w * out.stride(3)] = static_cast<scalar_t>(math::bilinear_value<scalar_t, acc_t>(
            plane, part.stride(2), part.stride(3), row_taps, column_taps[i][w]));
      }
    }
  });
}

void upsample_concat_out_cpu(
    const at::Tensor& out,
    at::TensorList parts,
    at::IntArrayRef channel_offsets) {
  check_upsample_concat_out_args(out, parts, channel_offsets);
  TORCH_CHECK(out.device().is_cpu(), "upsample_concat_out_cpu got a tensor on ", out.device());
  if (out.numel() == 0 || parts.empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "upsample_concat_cpu", [&] {
        forward_rows<scalar_t>(out, parts, channel_offsets);
      });
}

at::Tensor upsample_concat_cpu(
    at::TensorList parts,
    at::IntArrayRef channel_offsets,
    int64_t channels,
    int64_t height,
    int64_t width) {
  at::Tensor out = allocate_upsample_concat_output(parts, channels, height, width);
  upsample_concat_out_cpu(out, parts, channel_offsets);
  return out;
}

template <typename scalar_t>
void backward_rows(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    const std::vector<at::Tensor>& gradients) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = grad_output.size(0);
  const int64_t out_h = grad_output.size(2);
  const int64_t out_w = grad_output.size(3);
  const scalar_t* grad_data = grad_output.const_data_ptr<scalar_t>();

  std::vector<int64_t> row_starts{0};
  int64_t widest = 1;
  for (const at::Tensor& gradient : gradients) {
    row_starts.push_back(row_starts.back() + batch * gradient.size(1) * gradient.size(2));
    widest = std::max(widest, gradient.size(3));
  }
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / widest);
  at::parallel_for(0, row_starts.back(), rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const size_t i = part_of_row(row_starts, row);
      const at::Tensor& gradient = gradients[i];
      const int64_t channels = gradient.size(1);
      const int64_t in_h = gradient.size(2);
      const int64_t in_w = gradient.size(3);
      const int64_t local = row - row_starts[i];
      const int64_t y = local % in_h;
      const int64_t c = (local / in_h) % channels;
      const int64_t n = local / in_h / channels;
      scalar_t* gradient_row = gradient.mutable_data_ptr<scalar_t>() + n * gradient.stride(0) +
          c * gradient.stride(1) + y * gradient.stride(2);
      const int64_t gradient_stride_w = gradient.stride(3);
      const scalar_t* grad_plane = grad_data + n * grad_output.stride(0) +
          (channel_offsets[i] + c) * grad_output.stride(1);
      if (math::resize_is_identity(in_h, in_w, out_h, out_w)) {
        for (int64_t x = 0; x < in_w; ++x) {
          gradient_row[x * gradient_stride_w] =
              grad_plane[y * grad_output.stride(2) + x * grad_output.stride(3)];
        }
        continue;
      }
      const acc_t scale_h = math::source_scale<acc_t>(in_h, out_h);
      const acc_t scale_w = math::source_scale<acc_t>(in_w, out_w);
      for (int64_t x = 0; x < in_w; ++x) {
        gradient_row[x * gradient_stride_w] =
            static_cast<scalar_t>(math::bilinear_input_gradient<scalar_t, acc_t>(
            grad_plane,
            grad_output.stride(2),
            grad_output.stride(3),
            y,
            x,
            in_h,
            in_w,
            out_h,
            out_w,
            scale_h,
            scale_w));
      }
    }
  });
}

std::vector<at::Tensor> upsample_concat_backward_cpu(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    at::IntArrayRef part_channels,
    at::IntArrayRef part_heights,
    at::IntArrayRef part_widths) {
  check_upsample_concat_backward_args(
      grad_output, channel_offsets, part_channels, part_heights, part_widths);
  TORCH_CHECK(
      grad_output.device().is_cpu(),
      "upsample_concat_backward_cpu got a tensor on ",
      grad_output.device());
  std::vector<at::Tensor> gradients = allocate_upsample_concat_part_gradients(
      grad_output, part_channels, part_heights, part_widths);
  if (grad_output.size(0) == 0 || gradients.empty()) {
    return gradients;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "upsample_concat_backward_cpu", [&] {
        backward_rows<scalar_t>(grad_output, channel_offsets, gradients);
      });
  return gradients;
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  m.impl("upsample_concat", &upsample_concat_cpu);
  m.impl("upsample_concat_out", &upsample_concat_out_cpu);
  m.impl("upsample_concat_backward", &upsample_concat_backward_cpu);
}

} // namespace ranet_fast::ops
