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
#include "fused_conv2d.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

namespace {

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
      dtype == at::kDouble;
}

at::ScalarType accumulation_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_input(const char* op_name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op_name, " expects x of shape [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(
      is_supported_dtype(x.scalar_type()),
      op_name,
      " expects float16, bfloat16, float32 or float64 tensors, got ",
      x.scalar_type());
  TORCH_CHECK(x.size(1) >= 1, op_name, " needs C >= 1, got x of shape ", x.sizes());
}

void check_vector(const char* op_name, const at::Tensor& vector, const char* name, const at::Tensor& x) {
  TORCH_CHECK(
      vector.dim() == 1 && vector.size(0) == x.size(1),
      op_name,
      ": ",
      name,
      " must have shape [",
      x.size(1),
      "], got ",
      vector.sizes());
  TORCH_CHECK(
      vector.scalar_type() == accumulation_dtype(x),
      op_name,
      ": ",
      name,
      " must have the accumulation dtype ",
      accumulation_dtype(x),
      " for ",
      x.scalar_type(),
      " inputs, got ",
      vector.scalar_type());
  TORCH_CHECK(
      vector.device() == x.device(), op_name, ": ", name, " is on ", vector.device(), " but x is on ", x.device());
}

void check_vectors(
    const char* op_name,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias) {
  check_vector(op_name, mean, "mean", x);
  check_vector(op_name, invstd, "invstd", x);
  check_vector(op_name, weight, "weight", x);
  check_vector(op_name, bias, "bias", x);
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

void check_batch_norm_relu_args(
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias) {
  constexpr const char* kOpName = "ranet_fast::batch_norm_relu";
  check_input(kOpName, x);
  check_vectors(kOpName, x, mean, invstd, weight, bias);
}

void check_batch_norm_relu_out_args(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    int64_t out_offset) {
  constexpr const char* kOpName = "ranet_fast::batch_norm_relu_out";
  check_batch_norm_relu_args(x, mean, invstd, weight, bias);
  TORCH_CHECK(out.dim() == 4, kOpName, " expects out of shape [N, C_out, H, W], got ", out.sizes());
  TORCH_CHECK(
      out.scalar_type() == x.scalar_type(),
      kOpName,
      ": out has dtype ",
      out.scalar_type(),
      " but x has ",
      x.scalar_type());
  TORCH_CHECK(out.device() == x.device(), kOpName, ": out is on ", out.device(), " but x is on ", x.device());
  TORCH_CHECK(
      out.size(0) == x.size(0) && out.size(2) == x.size(2) && out.size(3) == x.size(3),
      kOpName,
      ": out ",
      out.sizes(),
      " does not have the batch and spatial size of x ",
      x.sizes());
  TORCH_CHECK(
      out_offset >= 0 && out_offset + x.size(1) <= out.size(1),
      kOpName,
      ": the output needs channels [",
      out_offset,
      ", ",
      out_offset + x.size(1),
      ") but out has ",
      out.size(1),
      " channels");
}

void check_batch_norm_relu_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias) {
  constexpr const char* kOpName = "ranet_fast::batch_norm_relu_backward";
  check_input(kOpName, x);
  check_vectors(kOpName, x, mean, invstd, weight, bias);
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
  return at::empty({x.size(1)}, x.options().dtype(accumulation_dtype(x)));
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
