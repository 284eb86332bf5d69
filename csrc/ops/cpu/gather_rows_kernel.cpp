// CPU kernel of ranet_fast::gather_rows.
//
// Every tensor's rows are cut into work items by gather_rows_math (the same
// plan as the CUDA kernel's blocks, so the CPU tests exercise that
// arithmetic), and one at::parallel_for covers the items of all tensors
// together, so a call with dozens of small tensors pays one parallel region.
// An item copies units [unit_begin, unit_end) of rows [row_begin, row_end)
// with one memcpy per row.
#include "../gather_rows.h"
#include "../gather_rows_math.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace ranet_fast::ops {

namespace {

namespace math = gather_rows_math;

// Bytes copied per parallel task: large enough to amortise scheduling.
constexpr int64_t kBytesPerTask = 64 * 1024;

struct CpuTensorCopy {
  RowCopyPlan copy;
  int64_t first_item;
};

std::vector<at::Tensor> gather_rows_cpu(at::TensorList tensors, const at::Tensor& index, bool check_index) {
  check_gather_rows_args(tensors, index);
  const at::Tensor contiguous_index = index.contiguous();
  const int64_t* values = contiguous_index.const_data_ptr<int64_t>();
  const int64_t rows_in = tensors[0].size(0);
  const int64_t rows_out = contiguous_index.numel();
  // Checked whatever check_index says: one pass over the indices costs
  // nothing next to the copies, and a bad index would read outside the input.
  (void)check_index;
  for (int64_t r = 0; r < rows_out; ++r) {
    TORCH_CHECK_INDEX(
        math::index_in_range(values[r], rows_in),
        "ranet_fast::gather_rows: index[",
        r,
        "] = ",
        values[r],
        " is out of range for tensors of ",
        rows_in,
        " rows");
  }

  std::vector<at::Tensor> outputs = allocate_gather_rows_outputs(tensors, rows_out);
  // Keeps the row-dense copies of non-row-dense inputs alive during the copy.
  std::vector<at::Tensor> sources;
  std::vector<CpuTensorCopy> copies;
  sources.reserve(tensors.size());
  copies.reserve(tensors.size());
  int64_t total_items = 0;
  int64_t total_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    sources.push_back(make_row_dense(tensors[i]));
    const RowCopyPlan copy = plan_row_copy(sources.back(), outputs[i], rows_in, rows_out);
    copies.push_back(CpuTensorCopy{copy, total_items});
    total_items += copy.plan.num_items;
    total_bytes += copy.row_bytes * rows_out;
  }
  if (total_items == 0) {
    return outputs;
  }
  const int64_t grain = std::max<int64_t>(1, kBytesPerTask / std::max<int64_t>(1, total_bytes / total_items));
  at::parallel_for(0, total_items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const CpuTensorCopy& tensor_copy =
          copies[math::find_tensor(copies.data(), static_cast<int>(copies.size()), item)];
      const RowCopyPlan& copy = tensor_copy.copy;
      const math::RowPlan& plan = copy.plan;
      const math::ItemExtent extent =
          math::item_extent(plan, item - tensor_copy.first_item, rows_out, math::kUnitsPerItem);
      const size_t bytes = static_cast<size_t>((extent.unit_end - extent.unit_begin) * plan.unit_bytes);
      for (int64_t row = extent.row_begin; row < extent.row_end; ++row) {
        std::memcpy(
            copy.dst + math::destination_offset(row, copy.row_bytes, extent.unit_begin, plan.unit_bytes),
            copy.src + math::source_offset(values[row], copy.src_stride_bytes, extent.unit_begin, plan.unit_bytes),
            bytes);
      }
    }
  });
  return outputs;
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
}

} // namespace ranet_fast::ops
