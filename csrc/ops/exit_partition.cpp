// Schemas of ranet_fast::exit_partition and its scatter form. Kernels live in cpu/ and cuda/; the
// fake (meta) implementation is registered from Python in
// ranet_fast/ops/exit_partition.py.
//
// The criterion travels as its name: a string argument is a compile-time
// constant to torch.compile and keeps direct torch.ops calls readable.
#include "exit_partition.h"
#include "checks.h"
#include "exit_confidence.h"
#include "scatter_exits.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

exit_partition_math::Criterion parse_criterion(c10::string_view criterion) {
  if (criterion == "max_softmax") {
    return exit_partition_math::Criterion::kMaxSoftmax;
  }
  TORCH_CHECK(
      criterion == "entropy",
      "ranet_fast::exit_partition: unknown criterion '",
      criterion,
      "'; choose max_softmax or entropy");
  return exit_partition_math::Criterion::kEntropy;
}

std::tuple<at::Tensor, at::Tensor> allocate_confidence_and_prediction(const at::Tensor& logits) {
  const int64_t num_rows = logits.size(0);
  return {
      at::empty({num_rows}, logits.options().dtype(accumulation_dtype(logits.scalar_type()))),
      at::empty({num_rows}, logits.options().dtype(at::kLong))};
}

void check_exit_partition_scatter_input(
    const at::Tensor& logits, const at::Tensor& positions, int64_t exit_index,
    const at::Tensor& result_logits, const at::Tensor& result_exit) {
  constexpr const char* kOp = "ranet_fast::exit_partition_scatter";
  check_exit_confidence_input(logits, kOp);
  check_result_writes(kOp, logits, positions, exit_index, result_logits, result_exit);
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def(
      "exit_partition(Tensor logits, float threshold, str criterion) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // exit_partition followed by scatter_exits of its leaving rows, in one
  // pass over the logits: what the early-exit engine runs at every exit.
  m.def(
      "exit_partition_scatter(Tensor logits, float threshold, str criterion, "
      "Tensor positions, int exit_index, Tensor(a!) result_logits, "
      "Tensor(b!) result_exit) -> (Tensor, Tensor)");
}

} // namespace ranet_fast::ops
