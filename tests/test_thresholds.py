"""Budgeted batch classification: thresholds, exits, accuracy and expected FLOPs."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranet_fast.inference import (
    DEFAULT_BUDGETS,
    ThresholdResult,
    dynamic_evaluation,
    evaluate_thresholds,
    exit_confidence,
    exit_probabilities,
    find_thresholds,
)

INF = math.inf


# ----------------------------------------------------------------------------------------
# Oracle: a plain loop transcription of the official semantics (adaptive_inference.py).
# ----------------------------------------------------------------------------------------
def oracle_thresholds(confidence, probs):
    """Walk each exit's samples from most to least confident, counting only samples that
    have not left yet; the out_n-th of them sets the threshold. out_n is floor(N * q_k)
    evaluated in float32 like the official code (float32 tensors)."""
    num_exits, num_samples = len(confidence), len(confidence[0])
    thresholds = [INF] * num_exits
    has_left = [False] * num_samples
    for k in range(num_exits - 1):
        out_n = math.floor(np.float32(num_samples) * np.float32(probs[k]))
        most_confident_first = sorted(range(num_samples), key=lambda i: -confidence[k][i])
        counted = 0
        for i in most_confident_first:
            if not has_left[i]:
                counted += 1
                if counted == out_n:
                    thresholds[k] = confidence[k][i]
                    break
        for i in range(num_samples):
            if confidence[k][i] >= thresholds[k]:
                has_left[i] = True
    thresholds[-1] = -INF
    return thresholds


def oracle_evaluate(confidence, predictions, targets, thresholds, flops):
    num_exits, num_samples = len(confidence), len(confidence[0])
    counts, correct, exits = [0] * num_exits, 0, []
    for i in range(num_samples):
        for k in range(num_exits):
            if confidence[k][i] >= thresholds[k]:
                counts[k] += 1
                correct += int(predictions[k][i] == targets[i])
                exits.append(k)
                break
    expected = sum(counts[k] / num_samples * flops[k] for k in range(num_exits))
    return correct * 100.0 / num_samples, expected, counts, exits


# ----------------------------------------------------------------------------------------
# A case worked out by hand.
# ----------------------------------------------------------------------------------------
def test_hand_worked_three_exits_eight_samples():
    # Target fractions q = (1/4, 1/2, 1/4): out_n = floor(8/4) = 2 at exit 0,
    # floor(8/2) = 4 at exit 1; the last exit takes the rest.
    probs = torch.tensor([0.25, 0.5, 0.25])
    confidence = torch.tensor([
        # s0    s1    s2    s3    s4    s5    s6    s7
        [0.90, 0.50, 0.80, 0.30, 0.80, 0.20, 0.60, 0.10],  # exit 0
        [0.99, 0.70, 0.99, 0.40, 0.95, 0.70, 0.30, 0.90],  # exit 1
        [0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50],  # exit 2
    ], dtype=torch.float64)
    # Exit 0: sorted 0.9 (s0), 0.8 (s2), 0.8 (s4), ... The 2nd is 0.8, so T0 = 0.8 and the
    # tie makes three samples leave: s0, s2, s4.
    # Exit 1: s0, s2, s4 have left and are not counted even though they are the most
    # confident here. Remaining in order: 0.9 (s7), 0.7 (s1), 0.7 (s5), 0.4 (s3), 0.3 (s6);
    # the 4th is 0.4, so T1 = 0.4 and s7, s1, s5, s3 leave.
    # Exit 2: s6. Counts (3, 4, 1).
    thresholds = find_thresholds(confidence, probs)
    assert thresholds.tolist() == [0.8, 0.4, -INF]
    assert thresholds.dtype == torch.float64

    targets = torch.zeros(8, dtype=torch.int64)
    predictions = torch.tensor([
        [0, 9, 0, 9, 3, 9, 9, 9],  # s0 right, s2 right, s4 wrong
        [9, 0, 9, 5, 9, 0, 9, 0],  # s1 right, s3 wrong, s5 right, s7 right
        [9, 9, 9, 9, 9, 9, 0, 9],  # s6 right
    ])
    flops = [10.0, 20.0, 40.0]
    result = evaluate_thresholds(confidence, predictions, targets, thresholds, flops)
    assert isinstance(result, ThresholdResult)
    assert result.exit_counts == [3, 4, 1]
    assert result.exit_index.tolist() == [0, 1, 0, 1, 0, 1, 2, 1]
    assert result.accuracy == 75.0  # 6 of 8 right
    assert result.expected_flops == 18.75  # (3*10 + 4*20 + 1*40) / 8


def test_hand_worked_nobody_leaves_when_out_n_is_zero_or_too_few_remain():
    confidence = torch.tensor([
        [0.5, 0.5, 0.5, 0.1],  # exit 0
        [0.9, 0.9, 0.9, 0.2],  # exit 1
        [0.6, 0.6, 0.6, 0.6],  # exit 2
    ])
    # Exit 0: out_n = floor(4 * 0.25) = 1; T0 = 0.5 and all three tied samples leave.
    # Exit 1: out_n = floor(4 * 0.75) = 3 but only s3 remains: T1 stays "never" (+inf),
    # although s3's confidence 0.2 would pass any threshold the official search could pick.
    thresholds = find_thresholds(confidence, torch.tensor([0.25, 0.75, 0.0]))
    assert thresholds.tolist() == [0.5, INF, -INF]
    result = evaluate_thresholds(confidence, torch.zeros(3, 4, dtype=torch.int64),
                                 torch.zeros(4, dtype=torch.int64), thresholds, [1, 2, 3])
    assert result.exit_counts == [3, 0, 1]
    assert result.expected_flops == pytest.approx((3 * 1 + 1 * 3) / 4)
    # out_n = floor(4 * 0.2) = 0 at exit 0: nobody leaves there.
    thresholds = find_thresholds(confidence, torch.tensor([0.2, 0.5, 0.3]))
    assert thresholds[0] == INF
    # Exit 1 then counts all four: out_n = 2, T1 = 0.9 (three tied samples leave).
    assert thresholds[1] == pytest.approx(0.9)


def test_exit_probabilities_follow_powers_of_p():
    q = exit_probabilities(0.5, 3)  # (1/2, 1/4, 1/8) normalised: (4/7, 2/7, 1/7)
    assert q.dtype == torch.float32
    assert q.tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7], rel=1e-6)
    assert exit_probabilities(1.0, 4).tolist() == [0.25] * 4
    q = exit_probabilities(1.95, 8)
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.all(q[1:] > q[:-1])
    assert exit_probabilities(3, 1).tolist() == [1.0]
    for bad_p in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="p must be"):
            exit_probabilities(bad_p, 3)
    with pytest.raises(ValueError, match="num_exits"):
        exit_probabilities(0.5, 0)


def test_default_budgets_are_the_official_39():
    assert len(DEFAULT_BUDGETS) == 39
    assert DEFAULT_BUDGETS[0] == 1 / 20 and DEFAULT_BUDGETS[-1] == 39 / 20


# ----------------------------------------------------------------------------------------
# Agreement with the oracle on random data.
# ----------------------------------------------------------------------------------------
def _random_case(seed):
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    num_exits = int(rng.integers(1, 7))
    num_samples = int(rng.choice([1, 2, 3, int(rng.integers(4, 200))]))
    logits = torch.randn(num_exits, num_samples, 5, generator=generator) * float(rng.uniform(0.5, 4))
    confidence = torch.softmax(logits, dim=2).amax(dim=2)
    if seed % 2:  # coarse confidences: many ties, also at the thresholds
        confidence = (confidence * 5).round() / 5
    predictions = logits.argmax(dim=2)
    targets = torch.randint(0, 5, (num_samples,), generator=generator)
    if seed % 3:
        probs = exit_probabilities(float(rng.choice(DEFAULT_BUDGETS)), num_exits)
    else:
        probs = torch.from_numpy(rng.dirichlet(np.ones(num_exits))).float()
    flops = sorted(rng.uniform(1, 100, num_exits).tolist())
    return confidence, predictions, targets, probs, flops


@pytest.mark.parametrize("first_seed", range(0, 300, 100))
def test_matches_loop_oracle_on_random_data(first_seed):
    for seed in range(first_seed, first_seed + 100):
        confidence, predictions, targets, probs, flops = _random_case(seed)
        expected_t = oracle_thresholds(confidence.tolist(), probs.tolist())
        thresholds = find_thresholds(confidence, probs)
        assert thresholds.tolist() == expected_t, f"seed {seed}"
        accuracy, expected_flops, counts, exits = oracle_evaluate(
            confidence.tolist(), predictions.tolist(), targets.tolist(), expected_t, flops)
        result = evaluate_thresholds(confidence, predictions, targets, thresholds, flops)
        assert result.exit_counts == counts, f"seed {seed}"
        assert result.exit_index.tolist() == exits, f"seed {seed}"
        assert result.accuracy == pytest.approx(accuracy, abs=1e-12), f"seed {seed}"
        assert result.expected_flops == pytest.approx(expected_flops, rel=1e-12), f"seed {seed}"


def test_single_exit_and_single_sample():
    confidence = torch.tensor([[0.3, 0.9, 0.6]])
    thresholds = find_thresholds(confidence, torch.tensor([1.0]))
    assert thresholds.tolist() == [-INF]
    result = evaluate_thresholds(confidence, torch.tensor([[1, 2, 3]]), torch.tensor([1, 0, 3]),
                                 thresholds, [5.0])
    assert result.exit_counts == [3]
    assert result.accuracy == pytest.approx(200 / 3)
    assert result.expected_flops == 5.0

    one = torch.tensor([[0.4], [0.7]])
    # out_n = floor(1 * 0.6) = 0: the sample goes on to the last exit.
    assert find_thresholds(one, torch.tensor([0.6, 0.4])).tolist() == [INF, -INF]
    # out_n = floor(1 * 1.0) = 1: the sample sets the threshold and leaves at exit 0.
    assert find_thresholds(one, torch.tensor([1.0, 0.0])).tolist() == [pytest.approx(0.4), -INF]


def test_floor_is_taken_in_the_dtype_of_probs():
    # 0.7 is 0.699999988079071 in float32, so 10 * q is 6.99999... in float64 arithmetic
    # but rounds to exactly 7.0 in float32, like the official float32 tensors.
    confidence = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)[None].repeat(2, 1)
    q32 = torch.tensor([0.7, 0.3], dtype=torch.float32)
    assert find_thresholds(confidence, q32)[0] == confidence[0, 6]  # 7th most confident
    q64 = q32.double()  # exactly the float32 value, now multiplied in float64
    assert find_thresholds(confidence, q64)[0] == confidence[0, 5]  # floor(6.99...) = 6


# ----------------------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------------------
@st.composite
def cases(draw):
    num_exits = draw(st.integers(1, 6))
    num_samples = draw(st.integers(1, 60))
    levels = draw(st.sampled_from([3, 10, 1000]))  # few levels -> many ties
    conf = draw(st.lists(st.integers(0, levels), min_size=num_exits * num_samples,
                         max_size=num_exits * num_samples))
    confidence = torch.tensor(conf, dtype=torch.float32).reshape(num_exits, num_samples) / levels
    p = draw(st.sampled_from(DEFAULT_BUDGETS))
    flops = sorted(draw(st.lists(st.floats(0.5, 1e9), min_size=num_exits, max_size=num_exits)))
    return confidence, exit_probabilities(p, num_exits), flops


@settings(max_examples=120, deadline=None)
@given(cases())
def test_every_sample_leaves_exactly_once(case):
    confidence, probs, flops = case
    num_exits, num_samples = confidence.shape
    thresholds = find_thresholds(confidence, probs)
    assert thresholds[-1] == -INF
    predictions = torch.zeros(num_exits, num_samples, dtype=torch.int64)
    result = evaluate_thresholds(confidence, predictions, torch.zeros(num_samples, dtype=torch.int64),
                                 thresholds, flops)
    assert sum(result.exit_counts) == num_samples
    assert len(result.exit_counts) == num_exits
    assert result.exit_index.shape == (num_samples,)
    assert torch.equal(torch.bincount(result.exit_index, minlength=num_exits),
                       torch.tensor(result.exit_counts))
    # The exit is the first one whose threshold the sample reaches.
    conf, t = confidence.tolist(), thresholds.tolist()
    for i, k in enumerate(result.exit_index.tolist()):
        assert conf[k][i] >= t[k]
        assert all(conf[j][i] < t[j] for j in range(k))
    assert min(flops) * (1 - 1e-12) <= result.expected_flops <= max(flops) * (1 + 1e-12)
    assert result.accuracy == 100.0
    # At most out_n samples are meant to leave at a non-final exit, unless tied at T_k.
    for k in range(num_exits - 1):
        out_n = math.floor(num_samples * probs[k])
        if result.exit_counts[k] > out_n:
            at_threshold = (result.exit_index == k) & (confidence[k] == thresholds[k])
            assert result.exit_counts[k] - int(at_threshold.sum()) < out_n


# ----------------------------------------------------------------------------------------
# dynamic_evaluation and input checks.
# ----------------------------------------------------------------------------------------
def test_dynamic_evaluation_fits_on_validation_and_applies_to_test():
    generator = torch.Generator().manual_seed(7)
    num_exits, num_classes = 4, 10
    val_logits = torch.randn(num_exits, 300, num_classes, generator=generator) * 3
    test_logits = torch.randn(num_exits, 200, num_classes, generator=generator) * 3
    val_targets = torch.randint(0, num_classes, (300,), generator=generator)
    test_targets = torch.randint(0, num_classes, (200,), generator=generator)
    flops = [1e6, 2e6, 3e6, 4e6]
    results = dynamic_evaluation(val_logits, val_targets, test_logits, test_targets, flops)
    assert [r["p"] for r in results] == list(DEFAULT_BUDGETS)

    def confidences(logits):
        pairs = [exit_confidence(x) for x in logits]
        return torch.stack([c for c, _ in pairs]), torch.stack([p for _, p in pairs])

    val_conf, val_pred = confidences(val_logits)
    test_conf, test_pred = confidences(test_logits)
    softmax_conf = torch.softmax(val_logits, dim=2).amax(dim=2)
    assert torch.allclose(val_conf, softmax_conf, rtol=1e-6, atol=1e-7)  # max softmax probability
    for r in results:
        thresholds = oracle_thresholds(val_conf.tolist(), exit_probabilities(r["p"], num_exits).tolist())
        assert r["thresholds"] == thresholds
        val_acc, _, _, _ = oracle_evaluate(val_conf.tolist(), val_pred.tolist(), val_targets.tolist(),
                                           thresholds, flops)
        test_acc, test_flops, test_counts, _ = oracle_evaluate(
            test_conf.tolist(), test_pred.tolist(), test_targets.tolist(), thresholds, flops)
        assert r["val_accuracy"] == pytest.approx(val_acc)
        assert r["test_accuracy"] == pytest.approx(test_acc)
        assert r["expected_flops"] == pytest.approx(test_flops)
        assert r["exit_counts"] == test_counts
    # Small p sends most samples out early, large p late.
    assert results[0]["expected_flops"] < results[-1]["expected_flops"]

    custom = dynamic_evaluation(val_logits, val_targets, test_logits, test_targets, flops, budgets=[0.5])
    assert len(custom) == 1 and custom[0]["p"] == 0.5


def test_bad_inputs_are_rejected_with_clear_errors():
    confidence = torch.rand(3, 5)
    with pytest.raises(ValueError, match="probs must be a tensor of shape \\[3\\]"):
        find_thresholds(confidence, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="shape \\[num_exits, num_samples\\]"):
        find_thresholds(torch.rand(5), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least one exit and one sample"):
        find_thresholds(torch.rand(3, 0), torch.ones(3) / 3)
    with pytest.raises(ValueError, match="NaN"):
        find_thresholds(torch.tensor([[0.5, math.nan]]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        find_thresholds(confidence, torch.tensor([0.5, -0.5, 1.0]))
    thresholds = find_thresholds(confidence, torch.ones(3) / 3)
    predictions, targets = torch.zeros(3, 5, dtype=torch.int64), torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="flops must hold one value per exit"):
        evaluate_thresholds(confidence, predictions, targets, thresholds, [1.0, 2.0])
    with pytest.raises(ValueError, match="predictions must have shape"):
        evaluate_thresholds(confidence, predictions[:2], targets, thresholds, [1, 2, 3])
    with pytest.raises(ValueError, match="targets must have shape \\[5\\]"):
        evaluate_thresholds(confidence, predictions, targets[:4], thresholds, [1, 2, 3])
    with pytest.raises(ValueError, match="thresholds must have shape \\[3\\]"):
        evaluate_thresholds(confidence, predictions, targets, thresholds[:2], [1, 2, 3])
    logits = torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="val_logits has 3 exits but test_logits has 2"):
        dynamic_evaluation(logits, targets, logits[:2], targets, [1, 2, 3])
    with pytest.raises(ValueError, match="test_logits must be a tensor of shape"):
        dynamic_evaluation(logits, targets, logits[0], targets, [1, 2, 3])
