// CPU kernels of ranet_fast::exit_partition, its scatter form
// exit_partition_scatter, and ranet_fast::exit_confidence (exit_partition's
// max_softmax confidence pass). The confidences are
// independent per row and split across threads with at::parallel_for, each
// row folded serially; the stable partition is two serial passes over N
// values (count the continuing rows, then place every row), which for
// batch-sized N costs far less than the confidences.
#include "../exit_partition.h"
#include "../exit_partition_math.h"
#include "../scatter_exits_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace ranet_fast::ops {

namespace {

namespace math = exit_partition_math;
namespace scatter_math = scatter_exits_math;
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

// The stable partition of rows 0..num_rows-1 by `leaves_at(row)`; returns
// how many continue.
template <typename LeavesAt>
int64_t partition_rows(LeavesAt leaves_at, int64_t num_rows, int64_t* order) {
  int64_t num_continue = 0;
  for (int64_t row = 0; row < num_rows; ++row) {
    num_continue += leaves_at(row) ? 0 : 1;
  }
  int64_t continuing_before = 0;
  for (int64_t row = 0; row < num_rows; ++row) {
    const bool leaves_now = leaves_at(row);
    order[math::partition_destination(
        leaves_now, row, continuing_before, num_continue)] = row;
    continuing_before += leaves_now ? 0 : 1;
  }
  return num_continue;
}

void partition_write(
    const at::Tensor& confidence, double threshold, const at::Tensor& order, const at::Tensor& num_continue) {
  AT_DISPATCH_FLOATING_TYPES(confidence.scalar_type(), "exit_partition_cpu", [&] {
    const scalar_t* values = confidence.const_data_ptr<scalar_t>();
    // Doubles beyond float's range round to +-inf.
    const auto level = static_cast<scalar_t>(threshold);
    *num_continue.mutable_data_ptr<int64_t>() = partition_rows(
        [&](int64_t row) { return math::leaves(values[row], level); }, confidence.size(0),
        order.mutable_data_ptr<int64_t>());
  });
}

// exit_partition_scatter: each row is folded, decided and, when it leaves,
// copied to its result row by the same task (leaving is a per-row decision),
// so the logits are read once; the partition then reads the N decisions.
template <Criterion criterion, typename scalar_t>
void decide_and_scatter_rows(const PartitionScatterArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rows = args.logits.size(0);
  const int64_t num_classes = args.logits.size(1);
  const scalar_t* logits = args.logits.const_data_ptr<scalar_t>();
  const int64_t* positions = args.positions.const_data_ptr<int64_t>();
  scalar_t* result = args.result_logits.mutable_data_ptr<scalar_t>();
  const int64_t result_row_stride = args.result_logits.stride(0);
  const int64_t result_column_stride = args.result_logits.stride(1);
  int64_t* result_exit = args.result_exit.mutable_data_ptr<int64_t>();
  const int64_t result_exit_stride = args.result_exit.stride(0);
  bool* leaves = args.leaves.mutable_data_ptr<bool>();
  const auto threshold = static_cast<acc_t>(args.threshold);
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / num_classes);
  at::parallel_for(0, num_rows, rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* row_logits = logits + row * num_classes;
      math::PartitionState<acc_t> state = math::empty_state<acc_t>();
      for (int64_t column = 0; column < num_classes; ++column) {
        math::update<criterion>(state, static_cast<acc_t>(row_logits[column]), column);
      }
      const bool leaves_now = math::leaves(math::confidence<criterion>(state, num_classes), threshold);
      leaves[row] = leaves_now;
      if (leaves_now) {
        const int64_t position = positions[row];
        for (int64_t column = 0; column < num_classes; ++column) {
          result[scatter_math::offset_2d(position, column, result_row_stride, result_column_stride)] =
              row_logits[column];
        }
        result_exit[position * result_exit_stride] = args.exit_index;
      }
    }
  });
}

void partition_scatter_write(const PartitionScatterArgs& args) {
  const int64_t num_rows = args.logits.size(0);
  const int64_t num_results = args.result_logits.size(0);
  const int64_t* positions = args.positions.const_data_ptr<int64_t>();
  // Every position is checked before anything is written, so a bad one
  // leaves the results untouched.
  for (int64_t row = 0; row < num_rows; ++row) {
    TORCH_CHECK(
        scatter_math::in_range(positions[row], num_results),
        "ranet_fast::exit_partition_scatter: positions[", row, "] = ", positions[row],
        " is out of range for M = ", num_results, " result rows");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logits.scalar_type(), "exit_partition_scatter_cpu",
                                  [&] {
    auto rows = args.criterion == Criterion::kEntropy ? &decide_and_scatter_rows<Criterion::kEntropy, scalar_t>
                                                      : &decide_and_scatter_rows<Criterion::kMaxSoftmax, scalar_t>;
    rows(args);
  });
  const bool* leaves = args.leaves.const_data_ptr<bool>();
  *args.num_continue.mutable_data_ptr<int64_t>() = partition_rows(
      [&](int64_t row) { return leaves[row]; }, num_rows, args.order.mutable_data_ptr<int64_t>());
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  register_exit_kernels<confidence_write, partition_write, partition_scatter_write>(m);
}

} // namespace ranet_fast::ops
