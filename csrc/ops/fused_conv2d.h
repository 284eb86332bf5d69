// Declarations shared by the fused_conv2d schemas and their kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace ranet_fast::ops {

// The Python wrapper validates first with friendlier messages; these checks
// guard direct calls of torch.ops.ranet_fast.fused_conv2d*.

// x [N, Ci, H, W] and weight [Co, Ci, k, k] of one floating dtype and device;
// square kernel, stride 1 or 2, padding 0 or (k - 1) / 2, an output of at
// least 1x1; each scale/shift present is a 1-D tensor of the accumulation
// dtype (float32, float64 for float64 x) on x's device with Ci (prologue) or
// Co (epilogue) entries; the prologue's scale and shift come together.
void check_fused_conv2d_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& prologue_scale,
    const c10::optional<at::Tensor>& prologue_shift,
    const c10::optional<at::Tensor>& epilogue_scale,
    const c10::optional<at::Tensor>& epilogue_shift,
    int64_t stride,
    int64_t padding);

// As check_fused_conv2d_args, plus: out is [N, C, Ho, Wo] of x's dtype and
// device and channels [out_offset, out_offset + Co) lie inside it.
void check_fused_conv2d_out_args(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& prologue_scale,
    const c10::optional<at::Tensor>& prologue_shift,
    const c10::optional<at::Tensor>& epilogue_scale,
    const c10::optional<at::Tensor>& epilogue_shift,
    int64_t stride,
    int64_t padding,
    int64_t out_offset);

// Whether the functional op's output is channels_last: when x's channels are
// innermost in memory (channels_last, or a channel slice of it). Same rule
// as output_memory_format in ranet_fast/ops/fused_conv2d.py.
bool fused_conv2d_channels_last(const at::Tensor& x);

// The functional op's [N, Co, Ho, Wo] output, uninitialised.
at::Tensor allocate_fused_conv2d_output(
    const at::Tensor& x,
    const at::Tensor& weight,
    int64_t stride,
    int64_t padding);

} // namespace ranet_fast::ops
