// Per-row arithmetic of exit_confidence, shared by the CPU and CUDA kernels.
//
// For one row x[0..C) of logits the op returns
//   confidence = max_c softmax(x)_c = 1 / sum_c exp(x_c - max(x))
//   prediction = argmax_c x_c (first index on ties, like torch.argmax)
// A row is folded into a RowState one element at a time (update) and partial
// states over disjoint column sets can be merged (combine), so the same code
// serves a serial loop on the CPU and a warp-shuffle reduction on the GPU.
//
// Non-finite values follow torch.softmax/torch.argmax: a NaN anywhere makes
// the confidence NaN and the prediction the first NaN's index; a row whose
// maximum is +inf or -inf gets a NaN confidence (torch.softmax yields NaN
// there because inf - inf is NaN).
//
// C10_HOST_DEVICE expands to `__host__ __device__` under nvcc and to nothing
// in a host-only (CppExtension) build.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace ranet_fast::ops::exit_confidence_math {

template <typename acc_t>
struct RowState {
  acc_t max_value;  // largest value seen so far (NaN once a NaN was seen)
  acc_t sum_exp;    // sum of exp(x_c - max_value) over the columns seen
  int64_t index;    // column of max_value; -1 while no column was seen
};

C10_HOST_DEVICE inline float exp_acc(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_acc(double x) { return ::exp(x); }

template <typename acc_t>
C10_HOST_DEVICE inline bool is_nan(acc_t x) {
  return x != x;
}

template <typename acc_t>
C10_HOST_DEVICE inline bool is_finite(acc_t x) {
  // NaN fails both comparisons; +-inf fail one.
  return x <= std::numeric_limits<acc_t>::max() &&
      x >= std::numeric_limits<acc_t>::lowest();
}

// exp(d), the weight of a term d = x - max relative to the maximum, with NaN
// counted as 0. d is NaN only for -inf - (-inf), +inf - (+inf) or a NaN
// operand. In the last two cases the maximum stays non-finite for good and
// the confidence is NaN whatever the sum. In the first, the -inf terms weigh
// exactly 0 once a finite maximum arrives; a NaN there would poison the sum
// (rows like [-inf, -inf, 3]).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t weight(acc_t d) {
  return is_nan(d) ? acc_t(0) : exp_acc(d);
}

template <typename acc_t>
C10_HOST_DEVICE inline RowState<acc_t> empty_state() {
  return RowState<acc_t>{acc_t(0), acc_t(0), -1};
}

// True when value `x` from a later column displaces the current maximum:
// NaN beats any number, otherwise only a strictly larger value wins.
template <typename acc_t>
C10_HOST_DEVICE inline bool displaces(acc_t x, acc_t current_max) {
  return x > current_max || (is_nan(x) && !is_nan(current_max));
}

// True when state `a` ranks above `b` as the argmax candidate: NaN beats any
// number, a larger value beats a smaller one, equal values go to the lower
// column index.
template <typename acc_t>
C10_HOST_DEVICE inline bool ranks_above(
    const RowState<acc_t>& a,
    const RowState<acc_t>& b) {
  const bool a_nan = is_nan(a.max_value);
  const bool b_nan = is_nan(b.max_value);
  if (a_nan != b_nan) {
    return a_nan;
  }
  if (!a_nan && a.max_value != b.max_value) {
    return a.max_value > b.max_value;
  }
  return a.index < b.index;
}

// Merges two states built from disjoint sets of columns of the same row.
template <typename acc_t>
C10_HOST_DEVICE inline RowState<acc_t> combine(
    const RowState<acc_t>& a,
    const RowState<acc_t>& b) {
  if (a.index < 0) {
    return b;
  }
  if (b.index < 0) {
    return a;
  }
  const bool a_wins = ranks_above(a, b);
  const RowState<acc_t>& winner = a_wins ? a : b;
  const RowState<acc_t>& loser = a_wins ? b : a;
  RowState<acc_t> merged = winner;
  // Rescale the loser's sum to the winner's maximum.
  merged.sum_exp = winner.sum_exp +
      loser.sum_exp * weight(loser.max_value - winner.max_value);
  return merged;
}

// Folds column `column` with value `x` into the state: the special case of
// combine() with a one-column state, written out because it runs once per
// element. Columns must arrive in increasing order, so an equal value never
// displaces the earlier column.
template <typename acc_t>
C10_HOST_DEVICE inline void update(RowState<acc_t>& state, acc_t x, int64_t column) {
  const bool takes_over = state.index < 0 || displaces(x, state.max_value);
  if (takes_over) {
    state.sum_exp = state.index < 0
        ? acc_t(1)
        : acc_t(1) + state.sum_exp * weight(state.max_value - x);
    state.max_value = x;
    state.index = column;
  } else {
    state.sum_exp += weight(x - state.max_value);
  }
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t confidence(const RowState<acc_t>& state) {
  if (!is_finite(state.max_value)) {
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
  return acc_t(1) / state.sum_exp;
}

} // namespace ranet_fast::ops::exit_confidence_math
