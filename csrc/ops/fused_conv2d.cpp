// Schemas of ranet_fast::fused_conv2d{,_out} and the argument checks shared by
// their CPU and CUDA kernels. The fake (meta) implementations and the autograd
// formula are registered from Python in ranet_fast/ops/fused_conv2d.py.
#include "fused_conv2d.h"
#include "checks.h"
#include "fused_conv2d_math.h"
#include "layout.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/square.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>

namespace ranet_fast::ops {

namespace {

constexpr const char* kOpName = "ranet_fast::fused_conv2d";

int64_t output_height(const FusedConv2dArgs& args) {
  return fused_conv2d_math::conv_output_size(args.x.size(2), args.weight.size(2), args.stride, args.padding);
}

int64_t output_width(const FusedConv2dArgs& args) {
  return fused_conv2d_math::conv_output_size(args.x.size(3), args.weight.size(2), args.stride, args.padding);
}

} // namespace

void check_fused_conv2d_args(const FusedConv2dArgs& args) {
  const at::Tensor& x = args.x;
  const at::Tensor& weight = args.weight;
  check_floating_tensor(kOpName, x, "x", 4, "[N, Ci, H, W]");
  TORCH_CHECK(
      weight.dim() == 4, kOpName, " expects weight of shape [Co, Ci, k, k], got ", weight.sizes());
  TORCH_CHECK(
      weight.scalar_type() == x.scalar_type(),
      kOpName,
      ": weight has dtype ",
      weight.scalar_type(),
      " but x has ",
      x.scalar_type());
  TORCH_CHECK(
      weight.device() == x.device(),
      kOpName,
      ": weight is on ",
      weight.device(),
      " but x is on ",
      x.device());
  TORCH_CHECK(
      weight.size(1) == x.size(1) && weight.size(0) >= 1 && weight.size(1) >= 1,
      kOpName,
      ": weight ",
      weight.sizes(),
      " does not match x ",
      x.sizes());
  const int64_t kernel = weight.size(2);
  TORCH_CHECK(
      kernel >= 1 && weight.size(3) == kernel,
      kOpName,
      " supports square kernels only, got ",
      weight.sizes());
  // The kernels index any stride >= 1 and padding >= 0 within bounds; the
  // Python wrapper narrows them to the supported stride 1 or 2 and padding 0
  // or (k - 1) / 2.
  TORCH_CHECK(args.stride >= 1, kOpName, " needs stride >= 1, got ", args.stride);
  TORCH_CHECK(args.padding >= 0, kOpName, " needs padding >= 0, got ", args.padding);
  TORCH_CHECK(
      output_height(args) >= 1 && output_width(args) >= 1,
      kOpName,
      ": the convolution leaves no output for an input of shape ",
      x.sizes());
  // The kernels apply the prologue when its scale is given and then read its shift.
  TORCH_CHECK(
      args.prologue_scale.has_value() == args.prologue_shift.has_value(),
      kOpName,
      ": prologue_scale and prologue_shift come together");
  for (const auto activation : {args.prologue_activation, args.activation}) {
    const auto code = static_cast<int64_t>(activation);
    TORCH_CHECK(
        code >= 0 && code < fused_conv2d_math::kActivationCount,
        kOpName,
        ": activation code ",
        code,
        " is none of the ",
        fused_conv2d_math::kActivationCount,
        " activations (ACTIVATIONS in ranet_fast/ops/fused_conv2d.py)");
  }
  check_channel_vector(kOpName, args.prologue_scale, "prologue_scale", x.size(1), x);
  check_channel_vector(kOpName, args.prologue_shift, "prologue_shift", x.size(1), x);
  check_channel_vector(kOpName, args.epilogue_scale, "epilogue_scale", weight.size(0), x);
  check_channel_vector(kOpName, args.epilogue_shift, "epilogue_shift", weight.size(0), x);
  // The kernels index the vectors as plain arrays.
  for (const auto* vector : {&args.prologue_scale, &args.prologue_shift, &args.epilogue_scale, &args.epilogue_shift}) {
    TORCH_CHECK(
        !vector->has_value() || (*vector)->is_contiguous(), kOpName, ": the scales and shifts must be contiguous");
  }
}

void check_fused_conv2d_out_args(const at::Tensor& out, const FusedConv2dArgs& args, int64_t out_offset) {
  check_fused_conv2d_args(args);
  check_out_channel_slice(
      kOpName, out, args.x, {args.x.size(0), args.weight.size(0), output_height(args), output_width(args)}, out_offset);
}

void check_fused_conv2d_statistics(
    const at::Tensor& stats_sum, const at::Tensor& stats_sumsq, const FusedConv2dArgs& args) {
  check_channel_vector(kOpName, stats_sum, "stats_sum", args.weight.size(0), args.x);
  check_channel_vector(kOpName, stats_sumsq, "stats_sumsq", args.weight.size(0), args.x);
  TORCH_CHECK(
      stats_sum.is_contiguous() && stats_sumsq.is_contiguous(),
      kOpName,
      ": stats_sum and stats_sumsq must be contiguous");
  TORCH_CHECK(
      stats_sum.data_ptr() != stats_sumsq.data_ptr(), kOpName, ": stats_sum and stats_sumsq must be different tensors");
}

void store_channel_statistics(const at::Tensor& out_slice, const at::Tensor& stats_sum, const at::Tensor& stats_sumsq) {
  const at::Tensor values = out_slice.to(stats_sum.scalar_type());
  const std::array<int64_t, 3> reduced{0, 2, 3};
  // Tensor handles to the callers' storage: sum_out writes into it.
  at::Tensor sum = stats_sum, sumsq = stats_sumsq;
  at::sum_out(sum, values, reduced);
  at::sum_out(sumsq, at::square(values), reduced);
}

bool fused_conv2d_channels_last(const at::Tensor& x) {
  return channels_inner(x) || (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous());
}

at::Tensor allocate_fused_conv2d_output(const FusedConv2dArgs& args) {
  return at::empty(
      {args.x.size(0), args.weight.size(0), output_height(args), output_width(args)},
      args.x.options().memory_format(
          fused_conv2d_channels_last(args.x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def(
      "fused_conv2d(Tensor x, Tensor weight, Tensor? prologue_scale, Tensor? prologue_shift, "
      "Tensor? epilogue_scale, Tensor? epilogue_shift, int stride, int padding, int prologue_activation, "
      "int activation, float negative_slope) -> Tensor");
  m.def(
      "fused_conv2d_out(Tensor(a!) out, Tensor x, Tensor weight, Tensor? prologue_scale, "
      "Tensor? prologue_shift, Tensor? epilogue_scale, Tensor? epilogue_shift, int stride, "
      "int padding, int prologue_activation, int activation, float negative_slope, int out_offset) -> ()");
  m.def(
      "fused_conv2d_stats_out(Tensor(a!) out, Tensor(b!) stats_sum, Tensor(c!) stats_sumsq, Tensor x, "
      "Tensor weight, Tensor? prologue_scale, Tensor? prologue_shift, Tensor? epilogue_scale, "
      "Tensor? epilogue_shift, int stride, int padding, int prologue_activation, int activation, "
      "float negative_slope, int out_offset) -> ()");
}

} // namespace ranet_fast::ops
