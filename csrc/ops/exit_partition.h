// Declarations shared by the exit_partition schema and its kernels.
#pragma once

#include "exit_partition_math.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace ranet_fast::ops {

// Rejects logits that are not a floating [N, C] tensor with C >= 1 (the
// exit_confidence check under this op's name) and a NaN threshold.
void check_exit_partition_input(const at::Tensor& logits, double threshold);

// "max_softmax" or "entropy"; anything else fails a TORCH_CHECK.
exit_partition_math::Criterion parse_criterion(c10::string_view criterion);

} // namespace ranet_fast::ops
