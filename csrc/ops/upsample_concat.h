// Declarations shared by the upsample_concat schemas and their kernels, and
// the op's entry points, written once over a device's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <vector>

namespace ranet_fast::ops {

// out and every part are 4-D floating tensors of one dtype and device with the
// same batch size, one channel offset per part, every slice
// [offset, offset + C_i) inside out's channels and no two slices overlapping.
void check_upsample_concat_out_args(
    const at::Tensor& out,
    at::TensorList parts,
    at::IntArrayRef channel_offsets);

// Output of the functional op: [N, channels, height, width], channels_last
// when parts[0] is channels_last (and not also NCHW-contiguous), else
// contiguous. Checks that there is at least one part, the sizes are >= 1 and
// the parts' channels add up to `channels`.
at::Tensor allocate_upsample_concat_output(
    at::TensorList parts,
    int64_t channels,
    int64_t height,
    int64_t width);

// grad_output is a 4-D floating tensor; the part lists have equal lengths,
// the sizes are >= 1 and the slices lie inside grad_output's channels.
void check_upsample_concat_backward_args(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    at::IntArrayRef part_channels,
    at::IntArrayRef part_heights,
    at::IntArrayRef part_widths);

// Whether the part gradients are channels_last: when grad_output's channels
// are innermost in memory (channels_last, or a channel slice of it), so that
// the gathers and the stores both run along channels. Same rule as the Triton
// kernels' gradient_memory_format and the Python fake implementation.
bool upsample_concat_gradients_channels_last(const at::Tensor& grad_output);

// One [N, C_i, H_i, W_i] gradient per part, channels_last or contiguous as
// upsample_concat_gradients_channels_last says.
std::vector<at::Tensor> allocate_upsample_concat_part_gradients(
    const at::Tensor& grad_output,
    at::IntArrayRef part_channels,
    at::IntArrayRef part_heights,
    at::IntArrayRef part_widths);

// A device's forward kernel on checked arguments with at least one part and
// a non-empty out: writes every part, resized to out's H x W, into its
// channel slice of out.
using UpsampleConcatWrite = void (*)(const at::Tensor& out, at::TensorList parts, at::IntArrayRef channel_offsets);

// ranet_fast::upsample_concat_out on one device.
template <UpsampleConcatWrite write>
void upsample_concat_out(const at::Tensor& out, at::TensorList parts, at::IntArrayRef channel_offsets) {
  check_upsample_concat_out_args(out, parts, channel_offsets);
  if (out.numel() == 0 || parts.empty()) {
    return;
  }
  write(out, parts, channel_offsets);
}

// ranet_fast::upsample_concat on one device.
template <UpsampleConcatWrite write>
at::Tensor upsample_concat_functional(
    at::TensorList parts,
    at::IntArrayRef channel_offsets,
    int64_t channels,
    int64_t height,
    int64_t width) {
  at::Tensor out = allocate_upsample_concat_output(parts, channels, height, width);
  upsample_concat_out<write>(out, parts, channel_offsets);
  return out;
}

// A device's backward kernel on checked arguments with a non-empty batch and
// at least one part: fills each part's gradient (allocated by
// allocate_upsample_concat_part_gradients) from its slice of grad_output.
using UpsampleConcatWriteGradients = void (*)(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    const std::vector<at::Tensor>& gradients);

// ranet_fast::upsample_concat_backward on one device.
template <UpsampleConcatWriteGradients write_gradients>
std::vector<at::Tensor> upsample_concat_backward(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    at::IntArrayRef part_channels,
    at::IntArrayRef part_heights,
    at::IntArrayRef part_widths) {
  check_upsample_concat_backward_args(grad_output, channel_offsets, part_channels, part_heights, part_widths);
  std::vector<at::Tensor> gradients =
      allocate_upsample_concat_part_gradients(grad_output, part_channels, part_heights, part_widths);
  if (grad_output.size(0) > 0 && !gradients.empty()) {
    write_gradients(grad_output, channel_offsets, gradients);
  }
  return gradients;
}

// Registers upsample_concat{,_out,_backward} for m's dispatch key over one
// device's kernels.
template <UpsampleConcatWrite write, UpsampleConcatWriteGradients write_gradients>
void register_upsample_concat_kernels(torch::Library& m) {
  m.impl("upsample_concat", &upsample_concat_functional<write>);
  m.impl("upsample_concat_out", &upsample_concat_out<write>);
  m.impl("upsample_concat_backward", &upsample_concat_backward<write_gradients>);
}

} // namespace ranet_fast::ops
