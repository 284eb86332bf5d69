"""Budgeted batch classification with the official RANet/MSDNet exit-threshold search."""

from ranet_fast.ops import exit_confidence

from .thresholds import (
    DEFAULT_BUDGETS,
    ThresholdResult,
    dynamic_evaluation,
    evaluate_thresholds,
    exit_probabilities,
    find_thresholds,
)

__all__ = [
    "DEFAULT_BUDGETS",
    "ThresholdResult",
    "dynamic_evaluation",
    "evaluate_thresholds",
    "exit_confidence",
    "exit_probabilities",
    "find_thresholds",
]
