// Schemas of ranet_fast::upsample_concat{,_out,_backward} and the argument
// checks shared by their CPU and CUDA kernels. The fake (meta) implementations
// and the autograd formula are registered from Python in
// ranet_fast/ops/upsample_concat.py.
#include "upsample_concat.h"
#include "checks.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

namespace ranet_fast::ops {

namespace {

// Slices [offset, offset + size) must lie in [0, total) and be disjoint.
void check_channel_slices(
    const char* op_name,
    at::IntArrayRef offsets,
    const std::vector<int64_t>& sizes,
    int64_t total) {
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (size_t i = 0; i < offsets.size(); ++i) {
    TORCH_CHECK(
        offsets[i] >= 0 && sizes[i] >= 1 && offsets[i] + sizes[i] <= total,
        op_name,
        ": part ",
        i,
        " needs channels [",
        offsets[i],
        ", ",
        offsets[i] + sizes[i],
        ") but the output has ",
        total,
        " channels");
    slices.emplace_back(offsets[i], offsets[i] + sizes[i]);
  }
  std::sort(slices.begin(), slices.end());
  for (size_t i = 1; i < slices.size(); ++i) {
    TORCH_CHECK(
        slices[i].first >= slices[i - 1].second,
        op_name,
        ": the channel slices [",
        slices[i - 1].first,
        ", ",
        slices[i - 1].second,
        ") and [",
        slices[i].first,
        ", ",
        slices[i].second,
        ") overlap");
  }
}

} // namespace

void check_upsample_concat_out_args(
    const at::Tensor& out,
    at::TensorList parts,
    at::IntArrayRef channel_offsets) {
  constexpr const char* op_name = "ranet_fast::upsample_concat";
  check_floating_tensor(op_name, out, "out", 4, "[N, C, H, W]");
  TORCH_CHECK(
      channel_offsets.size() == parts.size(),
      op_name,
      " needs one channel offset per part, got ",
      channel_offsets.size(),
      " offsets for ",
      parts.size(),
      " parts");
  TORCH_CHECK(
      out.size(2) >= 1 && out.size(3) >= 1,
      op_name,
      " needs an output size >= 1, got ",
      out.sizes());
  std::vector<int64_t> part_channels;
  for (size_t i = 0; i < parts.size(); ++i) {
    const at::Tensor& part = parts[i];
    TORCH_CHECK(
        part.dim() == 4,
        op_name,
        ": part ",
        i,
        " must have shape [N, C, H, W], got shape ",
        part.sizes());
    TORCH_CHECK(
        part.scalar_type() == out.scalar_type(),
        op_name,
        ": part ",
        i,
        " has dtype ",
        part.scalar_type(),
        " but out has dtype ",
        out.scalar_type());
    TORCH_CHECK(
        part.device() == out.device(),
        op_name,
        ": part ",
        i,
        " is on ",
        part.device(),
        " but out is on ",
        out.device());
    TORCH_CHECK(
        part.size(0) == out.size(0),
        op_name,
        ": part ",
        i,
        " has batch size ",
        part.size(0),
        " but out has ",
        out.size(0));
    TORCH_CHECK(
        part.size(1) >= 1 && part.size(2) >= 1 && part.size(3) >= 1,
        op_name,
        ": part ",
        i,
        " needs C, H, W >= 1, got shape ",
        part.sizes());
    part_channels.push_back(part.size(1));
  }
  check_channel_slices(op_name, channel_offsets, part_channels, out.size(1));
}

at::Tensor allocate_upsample_concat_output(
    at::TensorList parts,
    int64_t channels,
    int64_t height,
    int64_t width) {
  TORCH_CHECK(!parts.empty(), "ranet_fast::upsample_concat needs at least one part");
  TORCH_CHECK(
      channels >= 1 && height >= 1 && width >= 1,
      "ranet_fast::upsample_concat needs channels, height and width >= 1, got ",
      channels,
      ", ",
      height,
      ", ",
      width);
  int64_t covered = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK(
        parts[i].dim() == 4,
        "ranet_fast::upsample_concat: part ",
        i,
        " must have shape [N, C, H, W], got shape ",
        parts[i].sizes());
    covered += parts[i].size(1);
  }
  // With the slices disjoint and inside [0, channels) (checked when the parts
  // are written), equal totals mean they tile the channels: no channel of the
  // new tensor is left uninitialised.
  TORCH_CHECK(
      covered == channels,
      "ranet_fast::upsample_concat: the parts have ",
      covered,
      " channels in all but must tile the output's ",
      channels,
      " channels exactly");
  const at::Tensor& first = parts[0];
  const bool channels_last =
      first.is_contiguous(at::MemoryFormat::ChannelsLast) && !first.is_contiguous();
  return at::empty(
      {first.size(0), channels, height, width},
      first.options().memory_format(
          channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

void check_upsample_concat_backward_args(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    at::IntArrayRef part_channels,
    at::IntArrayRef part_heights,
    at::IntArrayRef part_widths) {
  constexpr const char* op_name = "ranet_fast::upsample_concat_backward";
  check_floating_tensor(op_name, grad_output, "grad_output", 4, "[N, C, H, W]");
  const size_t num_parts = channel_offsets.size();
  TORCH_CHECK(
      part_channels.size() == num_parts && part_heights.size() == num_parts &&
          part_widths.size() == num_parts,
      op_name,
      " needs as many part channels, heights and widths as channel offsets");
  for (size_t i = 0; i < num_parts; ++i) {
    TORCH_CHECK(
        part_heights[i] >= 1 && part_widths[i] >= 1,
        op_name,
        ": part ",
        i,
        " needs H, W >= 1, got ",
        part_heights[i],
        "x",
        part_widths[i]);
  }
  check_channel_slices(
      op_name,
      channel_offsets,
      std::vector<int64_t>(part_channels.begin(), part_channels.end()),
      grad_output.size(1));
}

bool upsample_concat_gradients_channels_last(const at::Tensor& grad_output) {
  return grad_output.size(1) > 1 && grad_output.stride(1) == 1;
}

std::vector<at::Tensor> allocate_upsample_concat_part_gradients(
    const at::Tensor& grad_output,
    at::IntArrayRef part_channels,
    at::IntArrayRef part_heights,
    at::IntArrayRef part_widths) {
  const at::MemoryFormat memory_format = upsample_concat_gradients_channels_last(grad_output)
      ? at::MemoryFormat::ChannelsLast
      : at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> gradients;
  gradients.reserve(part_channels.size());
  for (size_t i = 0; i < part_channels.size(); ++i) {
    gradients.push_back(at::empty(
        {grad_output.size(0), part_channels[i], part_heights[i], part_widths[i]},
        grad_output.options().memory_format(memory_format)));
  }
  return gradients;
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def(
      "upsample_concat(Tensor[] parts, int[] channel_offsets, int channels, "
      "int height, int width) -> Tensor");
  m.def("upsample_concat_out(Tensor(a!) out, Tensor[] parts, int[] channel_offsets) -> ()");
  m.def(
      "upsample_concat_backward(Tensor grad_output, int[] channel_offsets, "
      "int[] part_channels, int[] part_heights, int[] part_widths) -> Tensor[]");
}

} // namespace ranet_fast::ops
