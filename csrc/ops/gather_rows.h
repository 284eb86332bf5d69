// Declarations shared by the gather_rows schema and its kernels.
#pragma once

#include "gather_rows_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace ranet_fast::ops {

// The Python wrapper validates first with friendlier messages; these checks
// guard direct calls of torch.ops.ranet_fast.gather_rows. At least one tensor;
// each has dim >= 1, the same size(0) as tensor 0 and index's device; index is
// a 1-D int64 tensor.
void check_gather_rows_args(at::TensorList tensors, const at::Tensor& index);

// Strides of the row-dense layout of a tensor of these sizes and strides: the
// inner dims (1..) keep their order in memory (larger stride outer; on equal
// strides the lower dim outer) and are packed densely, the batch stride is
// the row's extent. Same rule as _row_dense_strides in
// ranet_fast/ops/gather_rows.py (the fake implementation).
std::vector<int64_t> row_dense_strides(at::IntArrayRef sizes, at::IntArrayRef strides);

// Whether each sample's elements of t form one dense block of memory laid out
// as row_dense_strides says (any batch stride, even 0), so that a row is one
// memcpy. Empty rows count as row-dense.
bool is_row_dense(const at::Tensor& t);

// t itself if it is row-dense, else a row-dense copy of all of it (one extra
// copy of the tensor, e.g. for a channel slice or an expanded inner dim).
at::Tensor make_row_dense(const at::Tensor& t);

// One output per input: [rows, *t.shape[1:]] with row_dense_strides of the
// input as given (not of its row-dense copy, whose strides of size-1 dims may
// order differently), so that the fake implementation, which sees only the
// inputs, computes the same strides. Output rows are packed copies of input rows.
std::vector<at::Tensor> allocate_gather_rows_outputs(at::TensorList tensors, int64_t rows);

// How the rows of one tensor are copied: from `source` (the input made
// row-dense) into `output`, in the units and work items gather_rows_math's
// plan_rows chooses for the two addresses.
struct RowCopyPlan {
  const char* src;
  char* dst;
  int64_t src_stride_bytes;
  int64_t row_bytes;
  gather_rows_math::RowPlan plan;
};

RowCopyPlan plan_row_copy(const at::Tensor& source, const at::Tensor& output, int64_t rows_in, int64_t rows_out);

} // namespace ranet_fast::ops
