"""Budgeted batch classification: the official RANet/MSDNet threshold search, vectorised.

Semantics follow ``adaptive_inference.py`` of the official code (``Tester.
dynamic_eval_find_threshold`` / ``dynamic_eval_with_threshold``):

* For a budget parameter ``p`` the fraction of samples meant to leave at exit ``k`` is
  ``q_k = p^k / sum_j p^j`` (k = 1..K), computed in float32 as ``exp(log(p) * k)`` like
  the official code, so that ``floor(n * q_k)`` lands on the same integer.
* On the validation set, exits are visited in order. At exit ``k < K`` the threshold
  ``T_k`` is the confidence of the ``out_n = floor(n * q_k)``-th most confident sample
  among those that have not left at an earlier exit (``n`` counts *all* samples). Then
  every remaining sample with confidence ``>= T_k`` leaves, so samples tied with the
  ``out_n``-th one all leave (more than ``out_n`` may go). If ``out_n`` is 0, or fewer
  than ``out_n`` samples remain, ``T_k`` stays "never" (+inf here, 1e8 in the official
  code: no max-softmax confidence reaches either) and nobody leaves at ``k``.
* The last exit takes everyone left: ``T_K = -inf`` (official: -1e8).
* A sample leaves at the first exit ``k`` with ``confidence_k >= T_k``; accuracy is the
  percentage of samples whose prediction at their exit is right, and the expected cost
  is ``sum_k count_k / n * flops_k``.

The ``out_n``-th largest value of a set does not depend on how ties are ordered, so the
thresholds equal the official ones bit for bit; the descending ``torch.sort`` is the
same call the official code makes.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ranet_fast.ops import exit_confidence

DEFAULT_BUDGETS = tuple(p / 20 for p in range(1, 40))
NEVER_EXIT = math.inf
ALWAYS_EXIT = -math.inf


@dataclass
class ThresholdResult:
    """Outcome of applying thresholds to one set of exit outputs."""

    accuracy: float          # percent of samples classified correctly at their exit
    expected_flops: float    # sum_k count_k / n * flops_k
    exit_counts: list[int]   # samples leaving at each exit (sums to n)
    exit_index: torch.Tensor  # int64 [n]: the exit each sample leaves at


def exit_probabilities(p: float, num_exits: int) -> torch.Tensor:
    """Fractions ``q_k`` proportional to ``p^k`` (k = 1..num_exits), float32, summing to 1."""
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits must be a positive integer, got {num_exits!r}")
    if isinstance(p, bool) or not (isinstance(p, numbers.Real) and math.isfinite(p) and p > 0):
        raise ValueError(f"p must be a positive finite number, got {p!r}")
    base = torch.tensor(float(p), dtype=torch.float32)
    powers = torch.exp(torch.log(base) * torch.arange(1, num_exits + 1, dtype=torch.float32))
    return powers / powers.sum()


def _check_confidence(confidence: torch.Tensor, name: str = "confidence") -> None:
    if not isinstance(confidence, torch.Tensor) or confidence.dim() != 2:
        raise ValueError(f"{name} must be a tensor of shape [num_exits, num_samples], "
                         f"got {getattr(confidence, 'shape', type(confidence))}")
    if confidence.shape[0] < 1 or confidence.shape[1] < 1:
        raise ValueError(f"{name} needs at least one exit and one sample, got shape {tuple(confidence.shape)}")
    if not confidence.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {confidence.dtype}")
    if not torch.isfinite(confidence).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def find_thresholds(confidence: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Official ``dynamic_eval_find_threshold``: per-exit thresholds from validation confidences.

    Args:
        confidence: [K, N] confidence (max softmax probability) of every exit on every sample.
        probs: [K] target exit fractions, e.g. ``exit_probabilities(p, K)``. ``floor(N *
            probs[k])`` is evaluated in ``probs``' dtype, like the official code.

    Returns:
        [K] thresholds in ``confidence``'s dtype; ``+inf`` for exits nobody leaves at,
        ``-inf`` for the last exit.
    """
    _check_confidence(confidence)
    num_exits, num_samples = confidence.shape
    if not isinstance(probs, torch.Tensor) or probs.shape != (num_exits,):
        raise ValueError(f"probs must be a tensor of shape [{num_exits}] (one per exit), "
                         f"got {getattr(probs, 'shape', type(probs))}")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError(f"probs must be finite and non-negative, got {probs.tolist()}")

    confidence = confidence.detach().cpu()
    probs = probs.detach().cpu()
    thresholds = torch.full((num_exits,), NEVER_EXIT, dtype=confidence.dtype)
    remaining = torch.ones(num_samples, dtype=torch.bool)
    for k in range(num_exits - 1):
        out_n = math.floor(num_samples * probs[k])
        if out_n == 0:
            continue
        sorted_conf, order = confidence[k].sort(descending=True)
        still_in = remaining[order]
        if int(still_in.sum()) < out_n:
            continue
        thresholds[k] = sorted_conf[still_in][out_n - 1]
        remaining &= confidence[k] < thresholds[k]
    thresholds[-1] = ALWAYS_EXIT
    return thresholds


def assign_exits(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """[N] int64: the first exit at which each sample's confidence reaches the threshold (the last
    exit takes everyone left, whatever its threshold)."""
    confidence = confidence.detach().cpu()
    passes = confidence >= thresholds.detach().cpu().to(confidence.dtype)[:, None]
    passes[-1] = True
    # Index of the first exit a sample passes = number of exits it fails before that.
    return (~passes).to(torch.int64).cumprod(dim=0).sum(dim=0)


def evaluate_thresholds(confidence: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor,
                        thresholds: torch.Tensor, flops: Sequence[float] | torch.Tensor) -> ThresholdResult:
    """Official ``dynamic_eval_with_threshold``: send each sample out at its first confident exit.

    Args:
        confidence: [K, N] confidences; predictions: [K, N] predicted classes;
        targets: [N] labels; thresholds: [K]; flops: K per-exit costs (cumulative).
    """
    _check_confidence(confidence)
    num_exits, num_samples = confidence.shape
    if not isinstance(predictions, torch.Tensor) or predictions.shape != confidence.shape:
        raise ValueError(f"predictions must have shape {tuple(confidence.shape)} like confidence, "
                         f"got {getattr(predictions, 'shape', type(predictions))}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (num_samples,):
        raise ValueError(f"targets must have shape [{num_samples}], got {getattr(targets, 'shape', type(targets))}")
    if not isinstance(thresholds, torch.Tensor) or thresholds.shape != (num_exits,):
        raise ValueError(f"thresholds must have shape [{num_exits}], "
                         f"got {getattr(thresholds, 'shape', type(thresholds))}")
    flops = torch.as_tensor(flops, dtype=torch.float64).detach().cpu()
    if flops.shape != (num_exits,):
        raise ValueError(f"flops must hold one value per exit ({num_exits}), got shape {tuple(flops.shape)}")

    exit_index = assign_exits(confidence, thresholds)
    chosen = predictions.detach().cpu().gather(0, exit_index[None]).squeeze(0)
    correct = int((chosen.to(torch.int64) == targets.detach().cpu().to(torch.int64)).sum())
    counts = torch.bincount(exit_index, minlength=num_exits)
    expected_flops = float((counts.to(torch.float64) * flops).sum() / num_samples)
    return ThresholdResult(
        accuracy=correct * 100.0 / num_samples,
        expected_flops=expected_flops,
        exit_counts=counts.tolist(),
        exit_index=exit_index,
    )


def _confidences(logits: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, N, C] logits -> ([K, N] max softmax probability, [K, N] argmax)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{name} must be a tensor of shape [num_exits, num_samples, num_classes], "
                         f"got {getattr(logits, 'shape', type(logits))}")
    pairs = [exit_confidence(exit_logits) for exit_logits in logits]
    confidence = torch.stack([c for c, _ in pairs])
    _check_confidence(confidence, f"the confidence computed from {name}")
    return confidence, torch.stack([p for _, p in pairs])


def dynamic_evaluation(val_logits: torch.Tensor, val_targets: torch.Tensor,
                       test_logits: torch.Tensor, test_targets: torch.Tensor,
                       flops: Sequence[float] | torch.Tensor,
                       budgets: Sequence[float] = DEFAULT_BUDGETS) -> list[dict]:
    """Official budgeted evaluation: thresholds found on validation logits, applied to test.

    Args:
        val_logits, test_logits: [K, N, C] logits of every exit (not softmax outputs).
        val_targets, test_targets: [N] labels.
        flops: K cumulative per-exit costs.
        budgets: values of ``p`` (official: p/20 for p = 1..39).

    Returns:
        One dict per budget with ``p``, ``val_accuracy``, ``test_accuracy`` (percent),
        ``expected_flops`` (test), ``exit_counts`` (test) and ``thresholds`` (list of float).
    """
    val_conf, val_pred = _confidences(val_logits, "val_logits")
    test_conf, test_pred = _confidences(test_logits, "test_logits")
    if val_conf.shape[0] != test_conf.shape[0]:
        raise ValueError(f"val_logits has {val_conf.shape[0]} exits but test_logits has {test_conf.shape[0]}")
    num_exits = val_conf.shape[0]
    results = []
    for p in budgets:
        thresholds = find_thresholds(val_conf, exit_probabilities(p, num_exits))
        val = evaluate_thresholds(val_conf, val_pred, val_targets, thresholds, flops)
        test = evaluate_thresholds(test_conf, test_pred, test_targets, thresholds, flops)
        results.append({
            "p": p,
            "val_accuracy": val.accuracy,
            "test_accuracy": test.accuracy,
            "expected_flops": test.expected_flops,
            "exit_counts": test.exit_counts,
            "thresholds": thresholds.tolist(),
        })
    return results


@dataclass
class Calibration:
    """Exit thresholds fitted on validation logits for one budget."""

    p: float                 # the budget parameter of the official schedule q_k ~ p^k
    thresholds: torch.Tensor  # [K], for early_exit or evaluate_thresholds
    expected_flops: float    # average multiply-adds per image on the validation set
    exit_counts: list[int]   # validation samples leaving at each exit


# Budget parameters searched for a FLOPs target: the official 39 and a fine geometric grid around
# them, so that very small and very large budgets are reachable too.
_P_GRID = tuple(sorted(set(DEFAULT_BUDGETS) | {10.0 ** (e / 40) for e in range(-120, 121)}))


def _calibrate_p(confidence: torch.Tensor, flops: torch.Tensor, p: float) -> Calibration:
    thresholds = find_thresholds(confidence, exit_probabilities(p, confidence.shape[0]))
    counts = torch.bincount(assign_exits(confidence, thresholds), minlength=confidence.shape[0])
    expected = float((counts.to(torch.float64) * flops).sum() / confidence.shape[1])
    return Calibration(p=float(p), thresholds=thresholds, expected_flops=expected, exit_counts=counts.tolist())


def calibrate_thresholds(val_logits: torch.Tensor, flops: Sequence[float] | torch.Tensor, *,
                         p: float | None = None, budget_flops: float | None = None) -> Calibration:
    """Thresholds for real early exit, fitted on validation logits with the official search.

    Give exactly one of
        p: a budget parameter of the official schedule (exit fractions ~ p^k; the official
            evaluation uses p = 1/20 ... 39/20);
        budget_flops: a target average of multiply-adds per image: the thresholds of the budget
            parameter whose validation cost is the largest not above the target (searched over the
            official values and a geometric grid from 1e-3 to 1e3).

    Args:
        val_logits: [K, N, C] logits of every exit on the validation set.
        flops: K cumulative per-exit costs (``count_flops``).
    """
    confidence, _ = _confidences(val_logits, "val_logits")
    num_exits = confidence.shape[0]
    flops = torch.as_tensor(flops, dtype=torch.float64).detach().cpu()
    if flops.shape != (num_exits,):
        raise ValueError(f"flops must hold one value per exit ({num_exits}), got shape {tuple(flops.shape)}")
    if (p is None) == (budget_flops is None):
        raise ValueError("calibrate_thresholds needs exactly one of p= and budget_flops=")
    if p is not None:
        if isinstance(p, bool) or not (isinstance(p, numbers.Real) and math.isfinite(p) and p > 0):
            raise ValueError(f"p must be a positive finite number, got {p!r}")
        return _calibrate_p(confidence, flops, float(p))
    if isinstance(budget_flops, bool) or not (isinstance(budget_flops, numbers.Real) and math.isfinite(budget_flops)):
        raise ValueError(f"budget_flops must be a finite number, got {budget_flops!r}")
    best = None
    for candidate in _P_GRID:
        calibration = _calibrate_p(confidence, flops, candidate)
        if calibration.expected_flops <= budget_flops and (
                best is None or calibration.expected_flops > best.expected_flops):
            best = calibration
    if best is None:
        cheapest = _calibrate_p(confidence, flops, _P_GRID[0]).expected_flops
        raise ValueError(f"budget_flops={budget_flops:.6g} is below the cheapest reachable budget "
                         f"({cheapest:.6g} multiply-adds per image on these validation logits)")
    return best
