// Declarations shared by the batch-norm training ops' schemas and kernels:
// batch_norm_stats, batch_norm_relu{,_out} and batch_norm_relu_backward, and
// the entry points of the last three, written once over a device's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

namespace ranet_fast::ops {

// The per-channel vectors that normalise x, contiguous (as the kernels read
// them): y = act((x - mean) * invstd * weight + bias).
struct BatchNormParams {
  at::Tensor mean;
  at::Tensor invstd;
  at::Tensor weight;
  at::Tensor bias;
};

// x [N, C, H, W] of a floating dtype with C >= 1 and N * H * W >= 2.
void check_batch_norm_stats_args(const at::Tensor& x);

// x [N, C, H, W] of a floating dtype, C >= 1; mean, invstd, weight and bias
// 1-D [C] tensors of the accumulation dtype (float32, float64 for float64 x)
// on x's device. Returns them contiguous.
BatchNormParams checked_batch_norm_params(
    const char* op_name, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias);

// out is [N, C_out, H, W] of x's dtype and device and channels
// [out_offset, out_offset + C) lie inside it.
void check_batch_norm_relu_out_args(const at::Tensor& out, const at::Tensor& x, int64_t out_offset);

// grad_out has x's shape, dtype and device.
void check_batch_norm_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& x);

// A new uninitialised tensor of x's shape and dtype in x's memory format
// (channels_last when x's channels are innermost, as fused_conv2d's output).
at::Tensor empty_like_batch_norm_input(const at::Tensor& x);

// [C] tensors of the accumulation dtype.
at::Tensor empty_channel_vector(const at::Tensor& x);

// A device's batch_norm_stats kernel on a checked x: each channel's mean and
// biased variance into mean and var ([C], the accumulation dtype).
using BatchNormStatsWrite = void (*)(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var);

// ranet_fast::batch_norm_stats on one device.
template <BatchNormStatsWrite write_stats>
std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x) {
  check_batch_norm_stats_args(x);
  at::Tensor mean = empty_channel_vector(x), var = empty_channel_vector(x);
  write_stats(x, mean, var);
  return {mean, var};
}

// A device's forward kernel: dst = act(normalize(x)) over x's [N, C, H, W],
// where dst has x's shape and any strides (the functional output or a
// channel slice of out=).
using BatchNormReluWrite =
    void (*)(const at::Tensor& dst, const at::Tensor& x, const BatchNormParams& params, bool relu);

// batch_norm_relu_backward's results: grad_x of x's shape and memory format,
// grad_weight and grad_bias [C] of the accumulation dtype.
struct BatchNormReluGradients {
  at::Tensor grad_x;
  at::Tensor grad_weight;
  at::Tensor grad_bias;
};

// A device's backward kernel on checked arguments with N * H * W >= 1: fills
// the gradients.
using BatchNormReluWriteGradients = void (*)(
    const at::Tensor& grad_out, const at::Tensor& x, const BatchNormParams& params, bool relu,
    const BatchNormReluGradients& gradients);

// ranet_fast::batch_norm_relu on one device.
template <BatchNormReluWrite write>
at::Tensor batch_norm_relu_functional(
    const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
    bool relu) {
  const BatchNormParams params =
      checked_batch_norm_params("ranet_fast::batch_norm_relu", x, mean, invstd, weight, bias);
  at::Tensor out = empty_like_batch_norm_input(x);
  write(out, x, params, relu);
  return out;
}

// ranet_fast::batch_norm_relu_out on one device: the result goes into
// channels [out_offset, out_offset + C) of out.
template <BatchNormReluWrite write>
void batch_norm_relu_out(
    const at::Tensor& out, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
    bool relu, int64_t out_offset) {
  const BatchNormParams params =
      checked_batch_norm_params("ranet_fast::batch_norm_relu_out", x, mean, invstd, weight, bias);
  check_batch_norm_relu_out_args(out, x, out_offset);
  write(out.narrow(1, out_offset, x.size(1)), x, params, relu);
}

// ranet_fast::batch_norm_relu_backward on one device.
template <BatchNormReluWriteGradients write_gradients>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
    bool relu) {
  const BatchNormParams params =
      checked_batch_norm_params("ranet_fast::batch_norm_relu_backward", x, mean, invstd, weight, bias);
  check_batch_norm_relu_backward_args(grad_out, x);
  const BatchNormReluGradients gradients{
      empty_like_batch_norm_input(x), empty_channel_vector(x), empty_channel_vector(x)};
  if (x.size(0) * x.size(2) * x.size(3) == 0) {
    // No values: the parameters' gradients are empty sums.
    gradients.grad_weight.zero_();
    gradients.grad_bias.zero_();
  } else {
    write_gradients(grad_out, x, params, relu, gradients);
  }
  return {gradients.grad_x, gradients.grad_weight, gradients.grad_bias};
}

// Registers the four batch-norm ops for m's dispatch key over one device's
// kernels.
template <
    BatchNormStatsWrite write_stats,
    BatchNormReluWrite write,
    BatchNormReluWriteGradients write_gradients>
void register_batch_norm_kernels(torch::Library& m) {
  m.impl("batch_norm_stats", &batch_norm_stats<write_stats>);
  m.impl("batch_norm_relu", &batch_norm_relu_functional<write>);
  m.impl("batch_norm_relu_out", &batch_norm_relu_out<write>);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward<write_gradients>);
}

} // namespace ranet_fast::ops
