// Argument checks shared by the ops' C++ entry points.
//
// The Python wrappers validate first, with friendlier messages; these checks
// guard direct torch.ops.ranet_fast.* calls, so that no kernel indexes memory
// with shapes, strides, dtypes or devices it was not written for.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace ranet_fast::ops {

// Fails unless `tensor` has `dims` dimensions (named by `shape`, e.g.
// "[N, C, H, W]") and one of the supported floating dtypes.
void check_floating_tensor(
    const char* op_name, const at::Tensor& tensor, const char* name, int64_t dims, const char* shape);

// The dtype kernels accumulate in (at::opmath_type): float64 for float64
// inputs, float32 for the others.
at::ScalarType accumulation_dtype(at::ScalarType dtype);

// `vector` is a 1-D tensor of `length` entries of x's accumulation dtype on
// x's device: the kernels read it as `length` plain acc_t values.
void check_channel_vector(
    const char* op_name,
    const at::Tensor& vector,
    const char* name,
    int64_t length,
    const at::Tensor& x);

// As check_channel_vector, for a vector that may be absent.
void check_channel_vector(
    const char* op_name,
    const c10::optional<at::Tensor>& vector,
    const char* name,
    int64_t length,
    const at::Tensor& x);

// `out` is a 4-D tensor of x's dtype and device with the batch and spatial
// size of output_sizes ([N, C, H, W], the functional form's output) whose
// channels [out_offset, out_offset + C) exist: the slice an _out kernel
// writes into.
void check_out_channel_slice(
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    at::IntArrayRef output_sizes,
    int64_t out_offset);

} // namespace ranet_fast::ops
