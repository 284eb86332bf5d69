// Schema of ranet_fast::exit_confidence. Its kernels are exit_partition's
// max_softmax confidence pass (cpu/ and cuda/exit_partition_kernel); the fake
// (meta) implementation is registered from Python in
// ranet_fast/ops/exit_confidence.py.
//
// Adding an op: put its schema in csrc/ops/<op>.cpp inside a
// TORCH_LIBRARY_FRAGMENT(ranet_fast, m) block like the one below, its entry
// points in csrc/ops/<op>.h as templates over a device's "write the result"
// function (argument checks there or in checks.h, written once), and those
// functions in csrc/ops/cpu/<op>_kernel.cpp and csrc/ops/cuda/<op>_kernel.cu,
// each registering the templates for its dispatch key (see fused_conv2d.h);
// setup.py picks up new files by glob.
#include "exit_confidence.h"
#include "checks.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace ranet_fast::ops {

void check_exit_confidence_input(const at::Tensor& logits, const char* op_name) {
  check_floating_tensor(op_name, logits, "logits", 2, "[N, C]");
  TORCH_CHECK(
      logits.size(1) >= 1,
      op_name,
      " needs at least one class (C >= 1), got shape ",
      logits.sizes());
}

TORCH_LIBRARY_FRAGMENT(ranet_fast, m) {
  m.def("exit_confidence(Tensor logits) -> (Tensor, Tensor)");
}

} // namespace ranet_fast::ops
