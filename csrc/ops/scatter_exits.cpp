// Schema of ranet_fast::scatter_exits, the in-place write of the samples that
// leave at one exit into the full-batch results. Kernels live in cpu/ and
// cuda/; the fake implementation is registered from Python in
// ranet_fast/ops/scatter_exits.py.
#include "scatter_exits.h"
#include "checks.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

namespace {

void check_index_vector(const at::Tensor& tensor, const char* name, int64_t size) {
  TORCH_CHECK(
      tensor.dim() == 1 && tensor.size(0) == size,
      "ranet_fast::scatter_exits expects ",
      name,
      " of shape [",
      size,
      "], got shape ",
      tensor.sizes());
  TORCH_CHECK(
      tensor.scalar_type() == at::kLong,
      "ranet_fast::scatter_exits expects ",
      name,
      " to be int64, got ",
      tensor.scalar_type());
}

} // namespace

void check_scatter_exits_input(const ScatterExitsArgs& args) {
  const auto& [result_logits, result_exit, logits, order, num_continue, positions, exit_index] = args;
  check_floating_tensor("ranet_fast::scatter_exits", logits, "logits", 2, "[N, C]");
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK(
      result_logits.dim() == 2 && result_logits.size(1) == logits.size(1),
      "ranet_fast::scatter_exits expects result_logits of shape [M, ",
      logits.size(1),
      "] (the logits' class count), got shape ",
      result_logits.sizes());
  TORCH_CHECK(
      result_logits.scalar_type() == dtype,
      "ranet_fast::scatter_exits expects result_logits of the logits' dtype ",
      dtype,
      ", got ",
      result_logits.scalar_type());
  check_index_vector(result_exit, "result_exit", result_logits.size(0));
  check_index_vector(order, "order", logits.size(0));
  check_index_vector(positions, "positions", logits.size(0));
  TORCH_CHECK(
      num_continue.dim() == 0 && num_continue.scalar_type() == at::kLong,
      "ranet_fast::scatter_exits expects num_continue to be a 0-dim int64 "
      "tensor, got shape ",
      num_continue.sizes(),
      " and dtype ",
      num_continue.scalar_type());
  TORCH_CHECK(
      exit_index >= 0,
      "ranet_fast::scatter_exits expects exit_index >= 0, got ",
      exit_index);
  for (const at::Tensor* tensor :
       {&result_logits, &result_exit, &order, &num_continue, &positions}) {
    TORCH_CHECK(
        tensor->device() == logits.device(),
        "ranet_fast::scatter_exits expects every tensor on the logits' device ",
        logits.device(),
        ", got one on ",
        tensor->device());
  }
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def(
      "scatter_exits(Tensor(a!) result_logits, Tensor(b!) result_exit, "
      "Tensor logits, Tensor order, Tensor num_continue, Tensor positions, "
      "int exit_index) -> ()");
}

} // namespace ranet_fast::ops
