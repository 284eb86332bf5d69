// Declarations shared by the batch-norm training ops' schemas and kernels:
// batch_norm_stats, batch_norm_relu{,_out} and batch_norm_relu_backward.
#pragma once

#include <ATen/core/Tensor.h>

namespace ranet_fast::ops {

// The Python wrapper validates first with friendlier messages; these checks
// guard direct calls of torch.ops.ranet_fast.batch_norm_*.

// x [N, C, H, W] of a floating dtype with C >= 1 and N * H * W >= 2.
void check_batch_norm_stats_args(const at::Tensor& x);

// x [N, C, H, W] of a floating dtype, C >= 1; mean, invstd, weight and bias
// 1-D [C] tensors of the accumulation dtype (float32, float64 for float64 x)
// on x's device.
void check_batch_norm_relu_args(
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias);

// As check_batch_norm_relu_args, plus: out is [N, C_out, H, W] of x's dtype
// and device and channels [out_offset, out_offset + C) lie inside it.
void check_batch_norm_relu_out_args(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    int64_t out_offset);

// As check_batch_norm_relu_args, plus: grad_out has x's shape, dtype and device.
void check_batch_norm_relu_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias);

// A new uninitialised tensor of x's shape and dtype in x's memory format
// (channels_last when x's channels are innermost, as fused_conv2d's output).
at::Tensor empty_like_batch_norm_input(const at::Tensor& x);

// [C] tensors of the accumulation dtype.
at::Tensor empty_channel_vector(const at::Tensor& x);

} // namespace ranet_fast::ops
