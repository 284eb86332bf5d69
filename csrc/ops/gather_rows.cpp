// Schema of ranet_fast::gather_rows, its argument checks and the layout rules
// shared by its CPU and CUDA kernels. The fake (meta) implementation and the
// autograd formula are registered from Python in ranet_fast/ops/gather_rows.py.
#include "gather_rows.h"

#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

namespace ranet_fast::ops {

void check_gather_rows_args(at::TensorList tensors, const at::Tensor& index) {
  constexpr const char* op_name = "ranet_fast::gather_rows";
  TORCH_CHECK(!tensors.empty(), op_name, " needs at least one tensor");
  TORCH_CHECK(
      index.dim() == 1 && index.scalar_type() == at::kLong,
      op_name,
      " expects a 1-D int64 index, got a ",
      index.dim(),
      "-D ",
      index.scalar_type(),
      " tensor of shape ",
      index.sizes());
  const int64_t rows = tensors[0].dim() >= 1 ? tensors[0].size(0) : 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(
        t.dim() >= 1, op_name, ": tensor ", i, " must have at least one dimension, got shape ", t.sizes());
    TORCH_CHECK(
        t.size(0) == rows,
        op_name,
        ": tensor ",
        i,
        " has ",
        t.size(0),
        " rows (shape ",
        t.sizes(),
        ") but tensor 0 has ",
        rows);
    TORCH_CHECK(
        t.device() == index.device(),
        op_name,
        ": tensor ",
        i,
        " is on ",
        t.device(),
        " but index is on ",
        index.device());
  }
}

std::vector<int64_t> row_dense_strides(at::IntArrayRef sizes, at::IntArrayRef strides) {
  const int64_t dims = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> inner(dims > 0 ? dims - 1 : 0);
  std::iota(inner.begin(), inner.end(), int64_t{1});
  // Outermost first; stable, so equal strides keep the lower dim outer.
  std::stable_sort(inner.begin(), inner.end(), [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });
  std::vector<int64_t> result(dims);
  int64_t extent = 1;
  for (auto dim = inner.rbegin(); dim != inner.rend(); ++dim) {
    result[*dim] = extent;
    // max(size, 1), as torch's contiguous strides do for empty dims.
    extent *= std::max<int64_t>(sizes[*dim], 1);
  }
  if (dims > 0) {
    result[0] = extent;
  }
  return result;
}

bool is_row_dense(const at::Tensor& t) {
  const std::vector<int64_t> dense = row_dense_strides(t.sizes(), t.strides());
  bool empty_row = false;
  bool dense_so_far = true;
  for (int64_t dim = 1; dim < t.dim(); ++dim) {
    empty_row = empty_row || t.size(dim) == 0;
    // A dim of size 1 never moves, so its stride does not matter.
    dense_so_far = dense_so_far && (t.size(dim) == 1 || t.stride(dim) == dense[dim]);
  }
  return empty_row || dense_so_far;
}

at::Tensor make_row_dense(const at::Tensor& t) {
  if (is_row_dense(t)) {
    return t;
  }
  at::Tensor dense = at::empty_strided(t.sizes(), row_dense_strides(t.sizes(), t.strides()), t.options());
  dense.copy_(t);
  return dense;
}

std::vector<at::Tensor> allocate_gather_rows_outputs(at::TensorList tensors, int64_t rows) {
  std::vector<at::Tensor> outputs;
  outputs.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    std::vector<int64_t> sizes = t.sizes().vec();
    sizes[0] = rows;
    outputs.push_back(at::empty_strided(sizes, row_dense_strides(t.sizes(), t.strides()), t.options()));
  }
  return outputs;
}

RowCopyPlan plan_row_copy(const at::Tensor& source, const at::Tensor& output, int64_t rows_in, int64_t rows_out) {
  namespace math = gather_rows_math;
  const int64_t element_bytes = static_cast<int64_t>(source.element_size());
  const int64_t row_bytes = (rows_in > 0 ? source.numel() / rows_in : 0) * element_bytes;
  const int64_t src_stride_bytes = source.stride(0) * element_bytes;
  const char* src = static_cast<const char*>(source.const_data_ptr());
  char* dst = static_cast<char*>(output.mutable_data_ptr());
  const int64_t unit_bytes = math::copy_unit_bytes(
      reinterpret_cast<uintptr_t>(src), reinterpret_cast<uintptr_t>(dst), row_bytes, src_stride_bytes);
  return {src, dst, src_stride_bytes, row_bytes, math::plan_rows(row_bytes, unit_bytes, rows_out, math::kUnitsPerItem)};
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def("gather_rows(Tensor[] tensors, Tensor index, bool check_index=True) -> Tensor[]");
}

} // namespace ranet_fast::ops
