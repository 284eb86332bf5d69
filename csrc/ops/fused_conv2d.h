// Declarations shared by the fused_conv2d schemas and their kernels, and the
// op's functional and _out entry points, written once over a device's kernel.
#pragma once

#include "fused_conv2d_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

namespace ranet_fast::ops {

// The arguments of one fused_conv2d call, as the schema names them.
struct FusedConv2dArgs {
  const at::Tensor& x;
  const at::Tensor& weight;
  const c10::optional<at::Tensor>& prologue_scale;
  const c10::optional<at::Tensor>& prologue_shift;
  const c10::optional<at::Tensor>& epilogue_scale;
  const c10::optional<at::Tensor>& epilogue_shift;
  int64_t stride;
  int64_t padding;
  fused_conv2d_math::Activation prologue_activation;
  fused_conv2d_math::Activation activation;
  double negative_slope; // of leaky_relu, in the prologue and the epilogue
};

// The schema's activation code as the enum; check_fused_conv2d_args refuses
// codes out of range.
inline fused_conv2d_math::Activation activation_of(int64_t code) {
  return static_cast<fused_conv2d_math::Activation>(code);
}

// x [N, Ci, H, W] and weight [Co, Ci, k, k] of one floating dtype and device;
// square kernel, stride >= 1, padding >= 0, an output of at least 1x1; each
// scale/shift present is a 1-D tensor of the accumulation dtype (float32,
// float64 for float64 x) on x's device with Ci (prologue) or Co (epilogue)
// entries; the prologue's scale and shift come together; both activation
// codes name an Activation.
void check_fused_conv2d_args(const FusedConv2dArgs& args);

// Whether the functional op's output is channels_last: when x's channels are
// innermost in memory (channels_last, or a channel slice of it). Same rule
// as output_memory_format in ranet_fast/ops/fused_conv2d.py.
bool fused_conv2d_channels_last(const at::Tensor& x);

// The functional op's [N, Co, Ho, Wo] output, uninitialised.
at::Tensor allocate_fused_conv2d_output(const FusedConv2dArgs& args);

// A device's kernel: writes the op's result into out_slice, an [N, Co, Ho, Wo]
// tensor of any strides (the functional output or a channel slice of out=).
using FusedConv2dWrite = void (*)(const at::Tensor& out_slice, const FusedConv2dArgs& args);

// A device's functional form on checked arguments: returns a new output.
using FusedConv2dCompute = at::Tensor (*)(const FusedConv2dArgs& args);

// The functional form for a device with no cheaper way than allocating the
// output and writing into it.
template <FusedConv2dWrite write>
at::Tensor write_into_new_output(const FusedConv2dArgs& args) {
  at::Tensor out = allocate_fused_conv2d_output(args);
  write(out, args);
  return out;
}

// ranet_fast::fused_conv2d on one device.
template <FusedConv2dCompute compute>
at::Tensor fused_conv2d_functional(
    const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& prologue_scale, const c10::optional<at::Tensor>& prologue_shift,
    const c10::optional<at::Tensor>& epilogue_scale, const c10::optional<at::Tensor>& epilogue_shift,
    int64_t stride, int64_t padding, int64_t prologue_activation, int64_t activation, double negative_slope) {
  const FusedConv2dArgs args{x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride,
                             padding, activation_of(prologue_activation), activation_of(activation), negative_slope};
  check_fused_conv2d_args(args);
  return compute(args);
}

// As check_fused_conv2d_args, plus: out is [N, C, Ho, Wo] of x's dtype and
// device and channels [out_offset, out_offset + Co) lie inside it.
void check_fused_conv2d_out_args(const at::Tensor& out, const FusedConv2dArgs& args, int64_t out_offset);

// ranet_fast::fused_conv2d_out on one device: the result goes into channels
// [out_offset, out_offset + Co) of out.
template <FusedConv2dWrite write>
void fused_conv2d_out(
    const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& prologue_scale, const c10::optional<at::Tensor>& prologue_shift,
    const c10::optional<at::Tensor>& epilogue_scale, const c10::optional<at::Tensor>& epilogue_shift,
    int64_t stride, int64_t padding, int64_t prologue_activation, int64_t activation, double negative_slope,
    int64_t out_offset) {
  const FusedConv2dArgs args{x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride,
                             padding, activation_of(prologue_activation), activation_of(activation), negative_slope};
  check_fused_conv2d_out_args(out, args, out_offset);
  write(out.narrow(1, out_offset, weight.size(0)), args);
}

// stats_sum and stats_sumsq are distinct contiguous [Co] tensors of the
// accumulation dtype on x's device.
void check_fused_conv2d_statistics(
    const at::Tensor& stats_sum, const at::Tensor& stats_sumsq, const FusedConv2dArgs& args);

// stats_sum[c] = sum of out_slice[:, c] over (N, H, W), stats_sumsq[c] the
// sum of its squares, in the statistics' dtype. A second pass over the
// output with ATen's reductions, on both devices: on the CPU the kernel is a
// composition around ATen's conv already, and on CUDA this kernel is the
// correctness backend (see cuda/fused_conv2d_kernel.cu) while the Triton
// kernel, the fast path, accumulates the statistics in its epilogue.
void store_channel_statistics(const at::Tensor& out_slice, const at::Tensor& stats_sum, const at::Tensor& stats_sumsq);

// ranet_fast::fused_conv2d_stats_out on one device: fused_conv2d_out, plus
// the per-channel statistics of the channels written.
template <FusedConv2dWrite write>
void fused_conv2d_stats_out(
    const at::Tensor& out, const at::Tensor& stats_sum, const at::Tensor& stats_sumsq, const at::Tensor& x,
    const at::Tensor& weight, const c10::optional<at::Tensor>& prologue_scale,
    const c10::optional<at::Tensor>& prologue_shift, const c10::optional<at::Tensor>& epilogue_scale,
    const c10::optional<at::Tensor>& epilogue_shift, int64_t stride, int64_t padding, int64_t prologue_activation,
    int64_t activation, double negative_slope, int64_t out_offset) {
  const FusedConv2dArgs args{x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride,
                             padding, activation_of(prologue_activation), activation_of(activation), negative_slope};
  check_fused_conv2d_out_args(out, args, out_offset);
  check_fused_conv2d_statistics(stats_sum, stats_sumsq, args);
  const at::Tensor out_slice = out.narrow(1, out_offset, weight.size(0));
  write(out_slice, args);
  store_channel_statistics(out_slice, stats_sum, stats_sumsq);
}

// Registers fused_conv2d{,_out,_stats_out} for m's dispatch key over one device's kernels.
template <FusedConv2dCompute compute, FusedConv2dWrite write>
void register_fused_conv2d_kernels(torch::Library& m) {
  m.impl("fused_conv2d", &fused_conv2d_functional<compute>);
  m.impl("fused_conv2d_out", &fused_conv2d_out<write>);
  m.impl("fused_conv2d_stats_out", &fused_conv2d_stats_out<write>);
}

} // namespace ranet_fast::ops
