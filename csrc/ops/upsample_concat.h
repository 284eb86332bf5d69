// Declarations shared by the upsample_concat schemas and their kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace ranet_fast::ops {

// The Python wrapper validates first with friendlier messages; these checks
// guard direct calls of torch.ops.ranet_fast.upsample_concat*.

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

} // namespace ranet_fast::ops
