// Schemas of the batch-norm training ops and the argument checks shared by
// their CPU and CUDA kernels:
//
//   batch_norm_stats(x) -> (mean, var)             per-channel mean, biased variance
//   batch_norm_relu(x, mean, invstd, weight, bias, relu) -> y
//   batch_norm_relu_out(out, ..., relu, out_offset)   y into a channel slice of out
//   batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, relu)
//       -> (grad_x, grad_weight, grad_bias)        training-mode gradient
//
// None is differentiable (they are the kernels of autograd.Functions). The
// fake (meta) implementations are registered from Python in
// ranet_fast/ops/batch_norm_relu.py.
#include "batch_norm_relu.h"
#include "checks.h"
#include "fused_conv2d.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

namespace {

void check_input(const char* op_name, const at::Tensor& x) {
  check_floating_tensor(op_name, x, "x", 4, "[N, C, H, W]");
  TORCH_CHECK(x.size(1) >= 1, op_name, " needs C >= 1, got x of shape ", x.sizes());
}

} // namespace

void check_batch_norm_stats_args(const at::Tensor& x) {
  constexpr const char* kOpName = "ranet_fast::batch_norm_stats";
  check_input(kOpName, x);
  TORCH_CHECK(
      x.size(0) * x.size(2) * x.size(3) >= 2,
      kOpName,
      " needs at least 2 values per channel (N * H * W >= 2), got x of shape ",
      x.sizes());
}

BatchNormParams checked_batch_norm_params(
    const char* op_name, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias) {
  check_input(op_name, x);
  check_channel_vector(op_name, mean, "mean", x.size(1), x);
  check_channel_vector(op_name, invstd, "invstd", x.size(1), x);
  check_channel_vector(op_name, weight, "weight", x.size(1), x);
  check_channel_vector(op_name, bias, "bias", x.size(1), x);
  return {mean.contiguous(), invstd.contiguous(), weight.contiguous(), bias.contiguous()};
}

void check_batch_norm_relu_out_args(const at::Tensor& out, const at::Tensor& x, int64_t out_offset) {
  check_out_channel_slice("ranet_fast::batch_norm_relu_out", out, x, x.sizes(), out_offset);
}

void check_batch_norm_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& x) {
  constexpr const char* kOpName = "ranet_fast::batch_norm_relu_backward";
  TORCH_CHECK(
      grad_out.sizes() == x.sizes(),
      kOpName,
      ": grad_out has shape ",
      grad_out.sizes(),
      " but x has ",
      x.sizes());
  TORCH_CHECK(
      grad_out.scalar_type() == x.scalar_type(),
      kOpName,
      ": grad_out has dtype ",
      grad_out.scalar_type(),
      " but x has ",
      x.scalar_type());
  TORCH_CHECK(
      grad_out.device() == x.device(),
      kOpName,
      ": grad_out is on ",
      grad_out.device(),
      " but x is on ",
      x.device());
}

at::Tensor empty_like_batch_norm_input(const at::Tensor& x) {
  return at::empty(
      x.sizes(),
      x.options().memory_format(
          fused_conv2d_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

at::Tensor empty_channel_vector(const at::Tensor& x) {
  return at::empty({x.size(1)}, x.options().dtype(accumulation_dtype(x.scalar_type())));
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def("batch_norm_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("batch_norm_relu(Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, bool relu) -> Tensor");
  m.def(
      "batch_norm_relu_out(Tensor(a!) out, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
      "bool relu, int out_offset) -> ()");
  m.def(
      "batch_norm_relu_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor weight, "
      "Tensor bias, bool relu) -> (Tensor, Tensor, Tensor)");
}

} // namespace ranet_fast::ops
