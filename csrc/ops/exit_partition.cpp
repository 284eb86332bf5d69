// Schemas of ranet_fast::exit_partition and its scatter form. Kernels live in cpu/ and cuda/; the
// fake (meta) implementation is registered from Python in
// ranet_fast/ops/exit_partition.py.
//
// The criterion travels as its name: a string argument is a compile-time
// constant to torch.compile and keeps direct torch.ops calls readable.
#include "exit_partition.h"
#include "checks.h"
#include "exit_confidence.h"

#include <ATen/MemoryOverlap.h>
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

namespace {

constexpr const char* kScatterOp = "ranet_fast::exit_partition_scatter";

void check_index_vector(const at::Tensor& tensor, const char* name, int64_t size, const char* size_name) {
  TORCH_CHECK(
      tensor.dim() == 1 && tensor.size(0) == size,
      kScatterOp, " expects ", name, " of shape [", size_name, "] = [", size, "], got shape ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == at::kLong, kScatterOp, " expects ", name, " to be int64, got ",
              tensor.scalar_type());
}

} // namespace

void check_exit_partition_scatter_input(
    const at::Tensor& logits, const at::Tensor& positions, int64_t exit_index,
    const at::Tensor& result_logits, const at::Tensor& result_exit) {
  check_exit_confidence_input(logits, kScatterOp);
  TORCH_CHECK(
      result_logits.dim() == 2 && result_logits.size(1) == logits.size(1),
      kScatterOp, " expects result_logits of shape [M, ", logits.size(1), "] (the logits' class count), got shape ",
      result_logits.sizes());
  TORCH_CHECK(
      result_logits.scalar_type() == logits.scalar_type(),
      kScatterOp, " expects result_logits of the logits' dtype ", logits.scalar_type(), ", got ",
      result_logits.scalar_type());
  check_index_vector(positions, "positions", logits.size(0), "N");
  check_index_vector(result_exit, "result_exit", result_logits.size(0), "M");
  TORCH_CHECK(exit_index >= 0, kScatterOp, " expects exit_index >= 0, got ", exit_index);
  for (const at::Tensor* tensor : {&positions, &result_logits, &result_exit}) {
    TORCH_CHECK(
        tensor->device() == logits.device(),
        kScatterOp, " expects every tensor on the logits' device ", logits.device(), ", got one on ",
        tensor->device());
  }
  // Two result rows sharing memory would make the writes race.
  for (const at::Tensor* tensor : {&result_logits, &result_exit}) {
    TORCH_CHECK(
        at::has_internal_overlap(*tensor) != at::MemOverlap::Yes,
        kScatterOp, " cannot write results whose elements overlap (e.g. an expanded tensor)");
  }
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
