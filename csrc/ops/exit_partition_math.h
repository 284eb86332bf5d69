// Per-row and per-index arithmetic of exit_partition and scatter_exits, shared
// by the CPU and CUDA kernels (so the CUDA arithmetic is exercised by the CPU
// tests).
//
// Confidence. The "max_softmax" criterion is exit_confidence's: the row is
// folded into an exit_confidence_math::RowState (max m, S = sum exp(x - m),
// argmax). The "entropy" criterion also keeps
//   T = sum_c exp(x_c - m) * (x_c - m),
// because with p_c = exp(x_c - m) / S the entropy is
//   H = -sum_c p_c log p_c = log S - T / S,
// and confidence = 1 - H / log C (1 - H for C == 1, where H is 0). When the
// maximum moves from m to m' (d = m - m' <= 0), every term rescales as
//   exp(x - m') (x - m') = exp(d) * exp(x - m) * ((x - m) + d),
// so T' = exp(d) * (T + d * S): the state stays foldable one element at a
// time and mergeable across disjoint column sets, like RowState.
//
// Terms with exp(.) == 0 contribute nothing (0 log 0 = 0), which also keeps
// -inf logits from turning T into -inf * 0 = NaN. Rows whose maximum is not
// finite (a NaN, +inf, or only -inf) get a NaN confidence for both criteria,
// as the reference's torch.softmax gives.
//
// Partition. A sample leaves when confidence >= threshold; a NaN confidence
// never leaves (the comparison is false). order lists the continuing rows in
// increasing order, then the leaving rows in increasing order, so the row at
// index i goes to
//   continuing_before(i)                          if it continues,
//   num_continue + (i - continuing_before(i))     if it leaves,
// where continuing_before(i) counts continuing rows among 0..i-1 (an
// exclusive prefix sum).
#pragma once

#include "exit_confidence_math.h"

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace ranet_fast::ops::exit_partition_math {

namespace confidence_math = exit_confidence_math;

// The criteria, as passed to the kernels. The schema takes the criterion's
// name; exit_partition.cpp maps it to this enum.
enum class Criterion : int { kMaxSoftmax = 0, kEntropy = 1 };

C10_HOST_DEVICE inline float log_acc(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double log_acc(double x) { return ::log(x); }

template <typename acc_t>
struct PartitionState {
  confidence_math::RowState<acc_t> row;  // max, sum of exp, argmax
  acc_t weighted_sum;  // T = sum exp(x - max) * (x - max); entropy only
};

template <typename acc_t>
C10_HOST_DEVICE inline PartitionState<acc_t> empty_state() {
  return PartitionState<acc_t>{confidence_math::empty_state<acc_t>(), acc_t(0)};
}

// exp(d) * (weighted_sum + d * sum_exp): a partial T moved from its own
// maximum to a maximum larger by -d. A zero weight (d == -inf, or underflow)
// contributes nothing rather than -inf * 0 = NaN; a NaN d also weighs 0 (see
// exit_confidence_math::weight).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rescaled_weighted_sum(
    acc_t weighted_sum,
    acc_t sum_exp,
    acc_t d) {
  const acc_t scale = confidence_math::weight(d);
  if (scale == acc_t(0)) {
    return acc_t(0);
  }
  return scale * (weighted_sum + d * sum_exp);
}

// Folds column `column` with value `x` into the state; columns must arrive
// in increasing order (see exit_confidence_math::update).
template <Criterion criterion, typename acc_t>
C10_HOST_DEVICE inline void update(
    PartitionState<acc_t>& state,
    acc_t x,
    int64_t column) {
  if (criterion == Criterion::kEntropy) {
    const bool was_empty = state.row.index < 0;
    const acc_t old_max = state.row.max_value;
    const acc_t old_sum = state.row.sum_exp;
    confidence_math::update(state.row, x, column);
    const acc_t new_max = state.row.max_value;
    // The old terms move to the new maximum; x adds exp(x - m') (x - m'),
    // which is the rescaling of a one-column state (T = 0, S = 1).
    const acc_t moved = was_empty
        ? acc_t(0)
        : rescaled_weighted_sum(state.weighted_sum, old_sum, old_max - new_max);
    state.weighted_sum =
        moved + rescaled_weighted_sum(acc_t(0), acc_t(1), x - new_max);
  } else {
    confidence_math::update(state.row, x, column);
  }
}

// Merges two states built from disjoint column sets of the same row.
template <Criterion criterion, typename acc_t>
C10_HOST_DEVICE inline PartitionState<acc_t> combine(
    const PartitionState<acc_t>& a,
    const PartitionState<acc_t>& b) {
  PartitionState<acc_t> merged;
  merged.row = confidence_math::combine(a.row, b.row);
  merged.weighted_sum = acc_t(0);
  if (criterion == Criterion::kEntropy) {
    const acc_t max_value = merged.row.max_value;
    if (a.row.index >= 0) {
      merged.weighted_sum += rescaled_weighted_sum(
          a.weighted_sum, a.row.sum_exp, a.row.max_value - max_value);
    }
    if (b.row.index >= 0) {
      merged.weighted_sum += rescaled_weighted_sum(
          b.weighted_sum, b.row.sum_exp, b.row.max_value - max_value);
    }
  }
  return merged;
}

template <Criterion criterion, typename acc_t>
C10_HOST_DEVICE inline acc_t confidence(
    const PartitionState<acc_t>& state,
    int64_t num_classes) {
  if (criterion == Criterion::kMaxSoftmax) {
    return confidence_math::confidence(state.row);
  }
  if (!confidence_math::is_finite(state.row.max_value)) {
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
  const acc_t sum_exp = state.row.sum_exp;
  const acc_t entropy = log_acc(sum_exp) - state.weighted_sum / sum_exp;
  const acc_t value = num_classes == 1
      ? acc_t(1) - entropy
      : acc_t(1) - entropy / log_acc(static_cast<acc_t>(num_classes));
  // The exact value lies in [0, 1]; rounding can step just outside it (a
  // uniform row's computed entropy can exceed the computed log C). Clamped
  // like the reference's torch.clamp.
  return value < acc_t(0) ? acc_t(0) : (value > acc_t(1) ? acc_t(1) : value);
}

// The threshold is compared in the confidence's type, as the reference's
// `confidence >= threshold` does for a tensor and a Python float (the float
// is rounded to the tensor's dtype). NaN confidences compare false, so they
// never leave.
template <typename acc_t>
C10_HOST_DEVICE inline bool leaves(acc_t confidence, acc_t threshold) {
  return confidence >= threshold;
}

// Position in `order` of row `index`; see the header comment.
C10_HOST_DEVICE inline int64_t partition_destination(
    bool leaves_now,
    int64_t index,
    int64_t continuing_before,
    int64_t num_continue) {
  return leaves_now ? num_continue + (index - continuing_before)
                    : continuing_before;
}

} // namespace ranet_fast::ops::exit_partition_math
