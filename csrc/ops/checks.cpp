// Argument checks shared by the ops' C++ entry points (see checks.h).
#include "checks.h"

#include <c10/util/Exception.h>

namespace ranet_fast::ops {

namespace {

// float16, bfloat16, float32 or float64: the dtypes every kernel is built for.
bool is_supported_floating_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

} // namespace

void check_floating_tensor(
    const char* op_name, const at::Tensor& tensor, const char* name, int64_t dims, const char* shape) {
  TORCH_CHECK(
      tensor.dim() == dims, op_name, " expects ", name, " of shape ", shape, ", got shape ", tensor.sizes());
  TORCH_CHECK(
      is_supported_floating_dtype(tensor.scalar_type()),
      op_name,
      " expects float16, bfloat16, float32 or float64 ",
      name,
      ", got ",
      tensor.scalar_type());
}

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_channel_vector(
    const char* op_name,
    const at::Tensor& vector,
    const char* name,
    int64_t length,
    const at::Tensor& x) {
  TORCH_CHECK(
      vector.dim() == 1 && vector.size(0) == length,
      op_name,
      ": ",
      name,
      " must have shape [",
      length,
      "], got ",
      vector.sizes());
  const at::ScalarType accumulation = accumulation_dtype(x.scalar_type());
  TORCH_CHECK(
      vector.scalar_type() == accumulation,
      op_name,
      ": ",
      name,
      " must have the accumulation dtype ",
      accumulation,
      " for ",
      x.scalar_type(),
      " inputs, got ",
      vector.scalar_type());
  TORCH_CHECK(
      vector.device() == x.device(), op_name, ": ", name, " is on ", vector.device(), " but x is on ", x.device());
}

void check_channel_vector(
    const char* op_name,
    const c10::optional<at::Tensor>& vector,
    const char* name,
    int64_t length,
    const at::Tensor& x) {
  if (vector.has_value()) {
    check_channel_vector(op_name, *vector, name, length, x);
  }
}

void check_out_channel_slice(
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    at::IntArrayRef output_sizes,
    int64_t out_offset) {
  TORCH_CHECK(out.dim() == 4, op_name, " expects out of shape [N, C, H, W], got ", out.sizes());
  TORCH_CHECK(
      out.scalar_type() == x.scalar_type(),
      op_name,
      ": out has dtype ",
      out.scalar_type(),
      " but x has ",
      x.scalar_type());
  TORCH_CHECK(out.device() == x.device(), op_name, ": out is on ", out.device(), " but x is on ", x.device());
  TORCH_CHECK(
      out.size(0) == output_sizes[0] && out.size(2) == output_sizes[2] && out.size(3) == output_sizes[3],
      op_name,
      ": out ",
      out.sizes(),
      " does not have the batch and spatial size of the output ",
      output_sizes);
  const int64_t channels = output_sizes[1];
  TORCH_CHECK(
      out_offset >= 0 && out_offset + channels <= out.size(1),
      op_name,
      ": the output needs channels [",
      out_offset,
      ", ",
      out_offset + channels,
      ") but out has ",
      out.size(1),
      " channels");
}

} // namespace ranet_fast::ops
