// CPU kernel of ranet_fast::exit_confidence: rows are independent, so they are
// split across threads with at::parallel_for and each row is folded serially.
#include "../exit_confidence.h"
#include "../exit_confidence_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace ranet_fast::ops {

namespace {

namespace math = exit_confidence_math;

// Elements per parallel task (ATen's elementwise grain size), so that small
// inputs stay on one thread.
constexpr int64_t kElementsPerTask = 32768;

template <typename scalar_t>
void exit_confidence_rows(
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
      math::RowState<acc_t> state = math::empty_state<acc_t>();
      for (int64_t column = 0; column < num_classes; ++column) {
        math::update(state, static_cast<acc_t>(row_logits[column]), column);
      }
      confidence[row] = math::confidence(state);
      prediction[row] = state.index;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> exit_confidence_cpu(const at::Tensor& logits) {
  check_exit_confidence_input(logits);
  TORCH_CHECK(
      logits.device().is_cpu(),
      "exit_confidence_cpu got a tensor on ",
      logits.device());
  const at::Tensor input = logits.contiguous();
  const int64_t num_rows = input.size(0);
  const int64_t num_classes = input.size(1);
  at::Tensor confidence = at::empty(
      {num_rows},
      input.options().dtype(exit_confidence_output_dtype(input.scalar_type())));
  at::Tensor prediction = at::empty({num_rows}, input.options().dtype(at::kLong));
  if (num_rows == 0) {
    return {confidence, prediction};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "exit_confidence_cpu", [&] {
        exit_confidence_rows<scalar_t>(
            input.const_data_ptr<scalar_t>(),
            num_rows,
            num_classes,
            confidence.mutable_data_ptr<at::opmath_type<scalar_t>>(),
            prediction.mutable_data_ptr<int64_t>());
      });
  return {confidence, prediction};
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  m.impl("exit_confidence", &exit_confidence_cpu);
}

} // namespace ranet_fast::ops
