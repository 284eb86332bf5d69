// Declarations shared by the exit_partition schemas (the op and its scatter
// form) and their kernels, and the entry point of exit_confidence, whose
// kernel is exit_partition's max_softmax confidence pass.
#pragma once

#include "exit_confidence.h"
#include "exit_partition_math.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <tuple>

namespace ranet_fast::ops {

// "max_softmax" or "entropy"; anything else fails a TORCH_CHECK.
exit_partition_math::Criterion parse_criterion(c10::string_view criterion);

// The per-row outputs of both ops for [N, C] logits, uninitialised:
// confidence [N] of the accumulation dtype and prediction [N] int64.
std::tuple<at::Tensor, at::Tensor> allocate_confidence_and_prediction(const at::Tensor& logits);

// A device's kernel: each row's confidence under `criterion` and its argmax,
// for contiguous [N, C] logits with N >= 1.
using ConfidenceWrite = void (*)(
    const at::Tensor& logits, exit_partition_math::Criterion criterion,
    const at::Tensor& confidence, const at::Tensor& prediction);

// ranet_fast::exit_confidence on one device.
template <ConfidenceWrite write>
std::tuple<at::Tensor, at::Tensor> exit_confidence(const at::Tensor& logits) {
  check_exit_confidence_input(logits);
  const at::Tensor input = logits.contiguous();
  auto [confidence, prediction] = allocate_confidence_and_prediction(input);
  if (input.size(0) > 0) {
    write(input, exit_partition_math::Criterion::kMaxSoftmax, confidence, prediction);
  }
  return {confidence, prediction};
}

// A device's partition kernel: the stable partition of the rows into those
// that continue (confidence < threshold) and those that leave, with the
// threshold rounded to the confidence's dtype once, as `tensor >= float` does
// in PyTorch. Writes every row index to its slot of order and the count of
// continuing rows to num_continue; runs for N == 0 too.
using PartitionWrite = void (*)(
    const at::Tensor& confidence, double threshold, const at::Tensor& order, const at::Tensor& num_continue);

// ranet_fast::exit_partition on one device.
template <ConfidenceWrite write_confidence, PartitionWrite write_partition>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_partition(
    const at::Tensor& logits,
    double threshold,
    c10::string_view criterion_name) {
  // A NaN threshold is the Python wrapper's to refuse: the kernels handle it
  // safely (no row leaves).
  check_exit_confidence_input(logits, "ranet_fast::exit_partition");
  const exit_partition_math::Criterion criterion = parse_criterion(criterion_name);
  const at::Tensor input = logits.contiguous();
  auto [confidence, prediction] = allocate_confidence_and_prediction(input);
  at::Tensor order = at::empty({input.size(0)}, input.options().dtype(at::kLong));
  at::Tensor num_continue = at::empty({}, input.options().dtype(at::kLong));
  if (input.size(0) > 0) {
    write_confidence(input, criterion, confidence, prediction);
  }
  write_partition(confidence, threshold, order, num_continue);
  return {confidence, prediction, order, num_continue};
}

// The arguments of one exit_partition_scatter call, checked, with logits and
// positions contiguous, and the outputs it allocated: leaves [N] bool scratch
// (each row's decision), order [N] int64 and num_continue (0-dim int64).
struct PartitionScatterArgs {
  const at::Tensor& logits;
  exit_partition_math::Criterion criterion;
  double threshold;
  const at::Tensor& positions;
  int64_t exit_index;
  const at::Tensor& result_logits;
  const at::Tensor& result_exit;
  const at::Tensor& leaves;
  const at::Tensor& order;
  const at::Tensor& num_continue;
};

// Shapes, dtypes and devices of exit_partition_scatter's arguments: logits
// [N, C] floating, positions [N] int64, result_logits [M, C] of the logits'
// dtype, result_exit [M] int64, all on one device, exit_index >= 0, the
// results without overlapping elements. Index values are the kernels' to
// check (they live on the device).
void check_exit_partition_scatter_input(
    const at::Tensor& logits, const at::Tensor& positions, int64_t exit_index,
    const at::Tensor& result_logits, const at::Tensor& result_exit);

// A device's exit_partition_scatter: in one pass over the logits, each row's
// confidence and decision (as exit_partition's), the leaving rows written to
// the results at their positions (as scatter_exits), each decision stored in
// `leaves`; then the stable partition of the decisions into order and
// num_continue. Runs for N == 0 too (it writes num_continue = 0).
using PartitionScatterWrite = void (*)(const PartitionScatterArgs& args);

// ranet_fast::exit_partition_scatter on one device: exit_partition and
// scatter_exits of its leaving rows in one call, returning (order,
// num_continue). The confidence and prediction are not materialised.
template <PartitionScatterWrite write>
std::tuple<at::Tensor, at::Tensor> exit_partition_scatter(
    const at::Tensor& logits,
    double threshold,
    c10::string_view criterion_name,
    const at::Tensor& positions,
    int64_t exit_index,
    const at::Tensor& result_logits,
    const at::Tensor& result_exit) {
  check_exit_partition_scatter_input(logits, positions, exit_index, result_logits, result_exit);
  const exit_partition_math::Criterion criterion = parse_criterion(criterion_name);
  // Inputs only: contiguous copies are fine. The results are written in
  // place through their own strides.
  const at::Tensor input = logits.contiguous();
  const at::Tensor position_values = positions.contiguous();
  const int64_t num_rows = input.size(0);
  const at::Tensor leaves = at::empty({num_rows}, input.options().dtype(at::kBool));
  at::Tensor order = at::empty({num_rows}, input.options().dtype(at::kLong));
  at::Tensor num_continue = at::empty({}, input.options().dtype(at::kLong));
  write(PartitionScatterArgs{
      input, criterion, threshold, position_values, exit_index, result_logits, result_exit, leaves, order,
      num_continue});
  return {order, num_continue};
}

// Registers exit_confidence, exit_partition and exit_partition_scatter for m's
// dispatch key over one device's kernels.
template <ConfidenceWrite write_confidence, PartitionWrite write_partition, PartitionScatterWrite write_scatter>
void register_exit_kernels(torch::Library& m) {
  m.impl("exit_confidence", &exit_confidence<write_confidence>);
  m.impl("exit_partition", &exit_partition<write_confidence, write_partition>);
  m.impl("exit_partition_scatter", &exit_partition_scatter<write_scatter>);
}

} // namespace ranet_fast::ops
