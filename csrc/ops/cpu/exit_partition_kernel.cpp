// CPU kernel of ranet_fast::exit_partition. The confidences are independent
// per row and split across threads with at::parallel_for; the stable
// partition is two serial passes over N values (count the continuing rows,
// then place every row), which for batch-sized N costs far less than the
// confidences.
#include "../exit_confidence.h"
#include "../exit_partition.h"
#include "../exit_partition_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_partition_cpu(
    const at::Tensor& logits,
    double threshold,
    c10::string_view criterion_name) {
  check_exit_partition_input(logits, threshold);
  const Criterion criterion = parse_criterion(criterion_name);
  TORCH_CHECK(
      logits.device().is_cpu(),
      "exit_partition_cpu got a tensor on ",
      logits.device());
  const at::Tensor input = logits.contiguous();
  const int64_t num_rows = input.size(0);
  const int64_t num_classes = input.size(1);
  at::Tensor confidence = at::empty(
      {num_rows},
      input.options().dtype(exit_confidence_output_dtype(input.scalar_type())));
  at::Tensor prediction = at::empty({num_rows}, input.options().dtype(at::kLong));
  at::Tensor order = at::empty({num_rows}, input.options().dtype(at::kLong));
  at::Tensor num_continue = at::empty({}, input.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "exit_partition_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        acc_t* confidence_data = confidence.mutable_data_ptr<acc_t>();
        if (criterion == Criterion::kEntropy) {
          confidence_rows<Criterion::kEntropy, scalar_t>(
              input.const_data_ptr<scalar_t>(), num_rows, num_classes,
              confidence_data, prediction.mutable_data_ptr<int64_t>());
        } else {
          confidence_rows<Criterion::kMaxSoftmax, scalar_t>(
              input.const_data_ptr<scalar_t>(), num_rows, num_classes,
              confidence_data, prediction.mutable_data_ptr<int64_t>());
        }
        // Rounded to the confidence's type once, as `tensor >= float` does
        // in PyTorch; doubles beyond float's range round to +-inf.
        *num_continue.mutable_data_ptr<int64_t>() = partition_rows<acc_t>(
            confidence_data, num_rows, static_cast<acc_t>(threshold),
            order.mutable_data_ptr<int64_t>());
      });
  return {confidence, prediction, order, num_continue};
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  m.impl("exit_partition", &exit_partition_cpu);
}

} // namespace ranet_fast::ops
