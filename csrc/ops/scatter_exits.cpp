// Schema of ranet_fast::scatter_exits, the in-place write of the samples that
// leave at one exit into the full-batch results. Kernels live in cpu/ and
// cuda/; the fake implementation is registered from Python in
// ranet_fast/ops/scatter_exits.py.
#include "scatter_exits.h"
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

namespace {

void check_index_vector(
    const char* op_name, const at::Tensor& tensor, const char* name, int64_t size, const char* size_name) {
  TORCH_CHECK(
      tensor.dim() == 1 && tensor.size(0) == size,
      op_name, " expects ", name, " of shape [", size_name, "] = [", size, "], got shape ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == at::kLong, op_name, " expects ", name, " to be int64, got ", tensor.scalar_type());
}

} // namespace

void check_result_writes(
    const char* op_name, const at::Tensor& logits, const at::Tensor& positions, int64_t exit_index,
    const at::Tensor& result_logits, const at::Tensor& result_exit) {
  TORCH_CHECK(
      result_logits.dim() == 2 && result_logits.size(1) == logits.size(1),
      op_name, " expects result_logits of shape [M, ", logits.size(1), "] (the logits' class count), got shape ",
      result_logits.sizes());
  TORCH_CHECK(
      result_logits.scalar_type() == logits.scalar_type(),
      op_name, " expects result_logits of the logits' dtype ", logits.scalar_type(), ", got ",
      result_logits.scalar_type());
  check_index_vector(op_name, result_exit, "result_exit", result_logits.size(0), "M");
  check_index_vector(op_name, positions, "positions", logits.size(0), "N");
  TORCH_CHECK(exit_index >= 0, op_name, " expects exit_index >= 0, got ", exit_index);
  for (const at::Tensor* tensor : {&positions, &result_logits, &result_exit}) {
    TORCH_CHECK(
        tensor->device() == logits.device(),
        op_name, " expects every tensor on the logits' device ", logits.device(), ", got one on ", tensor->device());
  }
  // Two result rows sharing memory would make the writes race.
  for (const at::Tensor* tensor : {&result_logits, &result_exit}) {
    TORCH_CHECK(
        at::has_internal_overlap(*tensor) != at::MemOverlap::Yes,
        op_name, " cannot write results whose elements overlap (e.g. an expanded tensor)");
  }
}

void check_scatter_exits_input(const ScatterExitsArgs& args) {
  const auto& [result_logits, result_exit, logits, order, num_continue, positions, exit_index] = args;
  constexpr const char* kOp = "ranet_fast::scatter_exits";
  check_floating_tensor(kOp, logits, "logits", 2, "[N, C]");
  check_index_vector(kOp, order, "order", logits.size(0), "N");
  TORCH_CHECK(
      num_continue.dim() == 0 && num_continue.scalar_type() == at::kLong,
      "ranet_fast::scatter_exits expects num_continue to be a 0-dim int64 "
      "tensor, got shape ",
      num_continue.sizes(),
      " and dtype ",
      num_continue.scalar_type());
  for (const at::Tensor* tensor : {&order, &num_continue}) {
    TORCH_CHECK(
        tensor->device() == logits.device(),
        kOp, " expects every tensor on the logits' device ", logits.device(), ", got one on ", tensor->device());
  }
  check_result_writes(kOp, logits, positions, exit_index, result_logits, result_exit);
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def(
      "scatter_exits(Tensor(a!) result_logits, Tensor(b!) result_exit, "
      "Tensor logits, Tensor order, Tensor num_continue, Tensor positions, "
      "int exit_index) -> ()");
}

} // namespace ranet_fast::ops
