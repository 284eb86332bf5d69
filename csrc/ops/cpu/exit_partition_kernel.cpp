// CPU kernels of ranet_fast::exit_partition and ranet_fast::exit_confidence
// (exit_partition's max_softmax confidence pass). The confidences are
// independent per row and split across threads with at::parallel_for, each
// row folded serially; the stable partition is two serial passes over N
// values (count the continuing rows, then place every row), which for
// batch-sized N costs far less than the confidences.
#include "../exit_partition.h"
#include "../exit_partition_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace ranet_fast::ops {

namespace {

namespace math = exit_partition_math;
using math::Criterion;

// Elements per parallel task (ATen's elementwise grain size), so that small
// inputs stay on one thread.
constexpr int64_t kElementsPerTask = 32768;

template <Criterion criterion, typename scalar_t>
void confidence_rows(
    const scalar_t* logits,
    int64_t num_rows,
    int64_t num_classes,
    at::opmath_type<scalar_t>* confidence,
    int64_t* prediction) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows_per_task =
      std::max<int64_t>(1, kElementsPerTask / num_classes);
  at::parallel_for(0, num_rows, rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* row_logits = logits + row * num_classes;
      math::PartitionState<acc_t> state = math::empty_state<acc_t>();
      for (int64_t column = 0; column < num_classes; ++column) {
        math::update<criterion>(
            state, static_cast<acc_t>(row_logits[column]), column);
      }
      confidence[row] = math::confidence<criterion>(state, num_classes);
      prediction[row] = state.row.index;
    }
  });
}

void confidence_write(
    const at::Tensor& logits, Criterion criterion, const at::Tensor& confidence, const at::Tensor& prediction) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "exit_confidence_cpu", [&] {
    auto rows = criterion == Criterion::kEntropy ? &confidence_rows<Criterion::kEntropy, scalar_t>
                                                 : &confidence_rows<Criterion::kMaxSoftmax, scalar_t>;
    rows(logits.const_data_ptr<scalar_t>(), logits.size(0), logits.size(1),
         confidence.mutable_data_ptr<at::opmath_type<scalar_t>>(), prediction.mutable_data_ptr<int64_t>());
  });
}

template <typename acc_t>
int64_t partition_rows(
    const acc_t* confidence,
    int64_t num_rows,
    acc_t threshold,
    int64_t* order) {
  int64_t num_continue = 0;
  for (int64_t row = 0; row < num_rows; ++row) {
    num_continue += math::leaves(confidence[row], threshold) ? 0 : 1;
  }
  int64_t continuing_before = 0;
  for (int64_t row = 0; row < num_rows; ++row) {
    const bool leaves_now = math::leaves(confidence[row], threshold);
    order[math::partition_destination(
        leaves_now, row, continuing_before, num_continue)] = row;
    continuing_before += leaves_now ? 0 : 1;
  }
  return num_continue;
}

void partition_write(
    const at::Tensor& confidence, double threshold, const at::Tensor& order, const at::Tensor& num_continue) {
  AT_DISPATCH_FLOATING_TYPES(confidence.scalar_type(), "exit_partition_cpu", [&] {
    // Doubles beyond float's range round to +-inf.
    *num_continue.mutable_data_ptr<int64_t>() = partition_rows<scalar_t>(
        confidence.const_data_ptr<scalar_t>(), confidence.size(0), static_cast<scalar_t>(threshold),
        order.mutable_data_ptr<int64_t>());
  });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  register_exit_kernels<confidence_write, partition_write>(m);
}

} // namespace ranet_fast::ops
