// Schemas of ranet_fast::fused_conv2d{,_out} and the argument checks shared by
// their CPU and CUDA kernels. The fake (meta) implementations and the autograd
// formula are registered from Python in ranet_fast/ops/fused_conv2d.py.
#include "fused_conv2d.h"
#include "fused_conv2d_math.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

namespace {

constexpr const char* kOpName = "ranet_fast::fused_conv2d";

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
      dtype == at::kDouble;
}

void check_vector(
    const c10::optional<at::Tensor>& vector,
    const char* name,
    int64_t length,
    const at::Tensor& x) {
  if (!vector.has_value()) {
    return;
  }
  const at::ScalarType accumulation = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(
      vector->dim() == 1 && vector->size(0) == length,
      kOpName,
      ": ",
      name,
      " must have shape [",
      length,
      "], got ",
      vector->sizes());
  TORCH_CHECK(
      vector->scalar_type() == accumulation,
      kOpName,
      ": ",
      name,
      " must have the accumulation dtype ",
      accumulation,
      " for ",
      x.scalar_type(),
      " inputs, got ",
      vector->scalar_type());
  TORCH_CHECK(
      vector->device() == x.device(),
      kOpName,
      ": ",
      name,
      " is on ",
      vector->device(),
      " but x is on ",
      x.device());
}

} // namespace

void check_fused_conv2d_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& prologue_scale,
    const c10::optional<at::Tensor>& prologue_shift,
    const c10::optional<at::Tensor>& epilogue_scale,
    const c10::optional<at::Tensor>& epilogue_shift,
    int64_t stride,
    int64_t padding) {
  TORCH_CHECK(x.dim() == 4, kOpName, " expects x of shape [N, Ci, H, W], got ", x.sizes());
  TORCH_CHECK(
      weight.dim() == 4, kOpName, " expects weight of shape [Co, Ci, k, k], got ", weight.sizes());
  TORCH_CHECK(
      is_supported_dtype(x.scalar_type()),
      kOpName,
      " expects float16, bfloat16, float32 or float64 tensors, got ",
      x.scalar_type());
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
  TORCH_CHECK(stride == 1 || stride == 2, kOpName, " supports stride 1 or 2, got ", stride);
  TORCH_CHECK(
      padding == 0 || padding == (kernel - 1) / 2,
      kOpName,
      " supports padding 0 or (k - 1) / 2, got ",
      padding,
      " for k = ",
      kernel);
  TORCH_CHECK(
      fused_conv2d_math::conv_output_size(x.size(2), kernel, stride, padding) >= 1 &&
          fused_conv2d_math::conv_output_size(x.size(3), kernel, stride, padding) >= 1,
      kOpName,
      ": the convolution leaves no output for an input of shape ",
      x.sizes());
  TORCH_CHECK(
      prologue_scale.has_value() == prologue_shift.has_value(),
      kOpName,
      ": prologue_scale and prologue_shift come together");
  check_vector(prologue_scale, "prologue_scale", x.size(1), x);
  check_vector(prologue_shift, "prologue_shift", x.size(1), x);
  check_vector(epilogue_scale, "epilogue_scale", weight.size(0), x);
  check_vector(epilogue_shift, "epilogue_shift", weight.size(0), x);
}

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
    int64_t out_offset) {
  check_fused_conv2d_args(
      x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride, padding);
  TORCH_CHECK(out.dim() == 4, kOpName, " expects out of shape [N, C, Ho, Wo], got ", out.sizes());
  TORCH_CHECK(
      out.scalar_type() == x.scalar_type(),
      kOpName,
      ": out has dtype ",
      out.scalar_type(),
      " but x has ",
      x.scalar_type());
  TORCH_CHECK(
      out.device() == x.device(), kOpName, ": out is on ", out.device(), " but x is on ", x.device());
  const int64_t kernel = weight.size(2);
  TORCH_CHECK(
      out.size(0) == x.size(0) &&
          out.size(2) == fused_conv2d_math::conv_output_size(x.size(2), kernel, stride, padding) &&
          out.size(3) == fused_conv2d_math::conv_output_size(x.size(3), kernel, stride, padding),
      kOpName,
      ": out ",
      out.sizes(),
      " does not have the output's batch and spatial size for x ",
      x.sizes());
  TORCH_CHECK(
      out_offset >= 0 && out_offset + weight.size(0) <= out.size(1),
      kOpName,
      ": the output needs channels [",
      out_offset,
      ", ",
      out_offset + weight.size(0),
      ") but out has ",
      out.size(1),
      " channels");
}

bool fused_conv2d_channels_last(const at::Tensor& x) {
  if (x.size(1) > 1 && x.stride(1) == 1) {
    return true;
  }
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::Tensor allocate_fused_conv2d_output(
    const at::Tensor& x,
    const at::Tensor& weight,
    int64_t stride,
    int64_t padding) {
  const int64_t kernel = weight.size(2);
  return at::empty(
      {x.size(0),
       weight.size(0),
       fused_conv2d_math::conv_output_size(x.size(2), kernel, stride, padding),
       fused_conv2d_math::conv_output_size(x.size(3), kernel, stride, padding)},
      x.options().memory_format(
          fused_conv2d_channels_last(x) ? at::MemoryFormat::ChannelsLast
                                        : at::MemoryFormat::Contiguous));
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def(
      "fused_conv2d(Tensor x, Tensor weight, Tensor? prologue_scale, Tensor? prologue_shift, "
      "Tensor? epilogue_scale, Tensor? epilogue_shift, int stride, int padding, bool relu) -> Tensor");
  m.def(
      "fused_conv2d_out(Tensor(a!) out, Tensor x, Tensor weight, Tensor? prologue_scale, "
      "Tensor? prologue_shift, Tensor? epilogue_scale, Tensor? epilogue_shift, int stride, "
      "int padding, bool relu, int out_offset) -> ()");
}

} // namespace ranet_fast::ops
