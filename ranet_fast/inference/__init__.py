"""Budgeted batch classification: the official exit-threshold search, and real early exit."""

from ranet_fast.ops import exit_confidence

from .early_exit import EarlyExitResult, early_exit, exit_flops
from .optimize import OptimizedModel, optimize
from .thresholds import (
    DEFAULT_BUDGETS,
    Calibration,
    ThresholdResult,
    assign_exits,
    calibrate_thresholds,
    dynamic_evaluation,
    evaluate_thresholds,
    exit_probabilities,
    find_thresholds,
)

__all__ = [
    "DEFAULT_BUDGETS",
    "Calibration",
    "EarlyExitResult",
    "OptimizedModel",
    "ThresholdResult",
    "assign_exits",
    "calibrate_thresholds",
    "dynamic_evaluation",
    "early_exit",
    "evaluate_thresholds",
    "exit_confidence",
    "exit_flops",
    "exit_probabilities",
    "find_thresholds",
    "optimize",
]
