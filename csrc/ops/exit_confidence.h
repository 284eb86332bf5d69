// Declarations shared by the exit_confidence schema and its kernels.
#pragma once

#include <ATen/core/Tensor.h>

namespace ranet_fast::ops {

// Rejects anything other than a floating [N, C] tensor with C >= 1. The Python
// wrapper validates first with friendlier messages; this guards direct calls of
// torch.ops.ranet_fast.exit_confidence (and of exit_partition, which takes the
// same logits and passes its own name for the messages).
void check_exit_confidence_input(
    const at::Tensor& logits,
    const char* op_name = "ranet_fast::exit_confidence");

} // namespace ranet_fast::ops
