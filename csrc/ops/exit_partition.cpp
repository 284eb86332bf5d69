// Schema of ranet_fast::exit_partition. Kernels live in cpu/ and cuda/; the
// fake (meta) implementation is registered from Python in
// ranet_fast/ops/exit_partition.py.
//
// The criterion travels as its name: a string argument is a compile-time
// constant to torch.compile and keeps direct torch.ops calls readable.
#include "exit_partition.h"
#include "exit_confidence.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>

namespace ranet_fast::ops {

void check_exit_partition_input(const at::Tensor& logits, double threshold) {
  check_exit_confidence_input(logits, "ranet_fast::exit_partition");
  TORCH_CHECK(
      !std::isnan(threshold),
      "ranet_fast::exit_partition: threshold is NaN; use -inf (every sample "
      "leaves) or +inf (none leaves)");
}

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

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def(
      "exit_partition(Tensor logits, float threshold, str criterion) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

} // namespace ranet_fast::ops
