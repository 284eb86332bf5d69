// Schema of ranet_fast::exit_confidence. Kernels live in cpu/ and cuda/; the
// fake (meta) implementation is registered from Python in
// ranet_fast/ops/exit_confidence.py.
//
// Adding an op: put its schema in csrc/ops/<op>.cpp inside a
// TORCH_LIBRARY_FRAGMENT(ranet_fast, m) block like the one below and its
// kernels in csrc/ops/cpu/<op>_kernel.cpp and csrc/ops/cuda/<op>_kernel.cu;
// setup.py picks up new files by glob.
#include "exit_confidence.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

void check_exit_confidence_input(const at::Tensor& logits, const char* op_name) {
  TORCH_CHECK(
      logits.dim() == 2,
      op_name,
      " expects logits of shape [N, C], got ",
      logits.dim(),
      "-D tensor of shape ",
      logits.sizes());
  TORCH_CHECK(
      logits.size(1) >= 1,
      op_name,
      " needs at least one class (C >= 1), got shape ",
      logits.sizes());
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK(
      dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
          dtype == at::kDouble,
      op_name,
      " expects float16, bfloat16, float32 or float64 logits, got ",
      dtype);
}

at::ScalarType exit_confidence_output_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def("exit_confidence(Tensor logits) -> (Tensor, Tensor)");
}

} // namespace ranet_fast::ops
