"""Real early-exit inference: samples that are confident enough leave, the rest run on, compacted.

The official RANet/MSDNet code only *simulates* budgeted inference from full forward passes. Here
the network really stops computing for the samples that have left: after every exit the engine

1. decides who leaves (``exit_partition``: confidence >= threshold, a stable order that puts the
   samples that continue first, and their count, all on the device),
2. writes the leaving samples' logits and exit index into the batch result at their original
   positions (``scatter_exits``),
3. reads the number that continue (the one device-to-host synchronisation per exit) and
4. compacts every tensor the rest of the network still needs with one ``gather_rows`` launch.

A stage nobody leaves at costs no copy; once nobody is left, no later stage runs.

The staged-model interface
--------------------------
Any multi-exit network can use the engine by providing

* ``num_exits``: the number of exits K;
* ``early_exit_start(x) -> state``: the computation before the first exit's stage, returning the
  state: a pytree (dicts, lists, tuples) of tensors whose dim 0 is the batch (tensors without a
  batch dim must not be in it);
* ``early_exit_stage(k, state) -> (logits_k, state)``: everything from after exit ``k - 1`` through
  exit ``k``'s classifier, returning exit ``k``'s ``[n, C]`` logits and the state for stage
  ``k + 1``. Every sample's result must not depend on the other samples of the batch (eval mode:
  BatchNorm with running statistics), and the state should hold only what later stages read,
  since all of it is copied when samples leave.

:class:`ranet_fast.models.RANet` and :class:`ranet_fast.models.MSDNet` implement it (each builds its
``forward`` on the same two methods),
and ``count_flops(model, size, exits=...)`` gives the per-exit costs that make the FLOPs report
(the default exits are ``model.classifier``; a model may name others in ``early_exit_modules``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ranet_fast.flops import count_flops
from ranet_fast.ops import exit_partition, gather_rows, scatter_exits

CRITERIA = ("max_softmax", "entropy")


@dataclass
class EarlyExitResult:
    """What :func:`early_exit` computed for one batch."""

    logits: torch.Tensor  # [N, C]: each sample's logits from the exit it left at
    exit_index: torch.Tensor  # [N] int64, 0-based
    exit_counts: list[int]  # samples leaving at each exit (sums to N)
    stage_batch_sizes: list[int]  # samples that ran each stage (0 for stages nobody reached)
    flops: float | None  # multiply-adds actually spent on the batch (None without per-exit FLOPs)

    @property
    def flops_per_image(self) -> float | None:
        total = sum(self.exit_counts)
        return None if self.flops is None or total == 0 else self.flops / total


def _check_model(model: nn.Module) -> int:
    missing = [name for name in ("num_exits", "early_exit_start", "early_exit_stage") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"early_exit needs a staged multi-exit model; {type(model).__name__} lacks {', '.join(missing)} "
            "(see the interface in ranet_fast.inference.early_exit)")
    if model.training:
        raise ValueError(
            "early_exit needs the model in eval mode (call model.eval()): in train mode BatchNorm "
            "normalises with statistics of whichever samples are still running")
    num_exits = int(model.num_exits)
    if num_exits < 1:
        raise ValueError(f"{type(model).__name__}.num_exits must be at least 1, got {num_exits}")
    return num_exits


def _check_thresholds(thresholds: Sequence[float] | torch.Tensor, num_exits: int) -> list[float]:
    if isinstance(thresholds, torch.Tensor):
        if thresholds.dim() != 1:
            raise ValueError(f"thresholds must be a 1-D tensor or a sequence, got shape {tuple(thresholds.shape)}")
        values = [float(t) for t in thresholds.detach().cpu().tolist()]
    else:
        try:
            values = [float(t) for t in thresholds]
        except (TypeError, ValueError) as error:
            raise TypeError(f"thresholds must be a sequence of numbers or a 1-D tensor: {error}") from None
    if len(values) not in (num_exits - 1, num_exits):
        raise ValueError(
            f"the model has {num_exits} exits, so thresholds needs {num_exits} values (or {num_exits - 1}: "
            f"the last exit takes every sample left), got {len(values)}")
    if any(math.isnan(t) for t in values):
        raise ValueError(f"thresholds must not be NaN, got {values}")
    # The last exit takes everyone left, whatever its threshold says (official: T_K = -1e8).
    return values[:num_exits - 1] + [-math.inf]


_FLOPS_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], list[int]]] = weakref.WeakKeyDictionary()


def exit_flops(model: nn.Module, image_size: tuple[int, int]) -> list[int]:
    """Cumulative multiply-adds per exit for one image (official op_counter rules), cached per model
    and image size (the count runs a batch-1 forward)."""
    per_size = _FLOPS_CACHE.setdefault(model, {})
    key = (int(image_size[0]), int(image_size[1]))
    if key not in per_size:
        per_size[key] = count_flops(model, key, exits=getattr(model, "early_exit_modules", None))
    return per_size[key]


def _compact(state, keep: torch.Tensor, positions: torch.Tensor):
    """Every tensor of ``state`` and ``positions`` restricted to the rows ``keep``, in one launch.

    A tensor reachable twice in the state (RANet's block outputs are also the next block's
    input) is copied once and stays shared.
    """
    leaves, spec = pytree.tree_flatten(state)
    unique: dict[int, int] = {}
    tensors: list[torch.Tensor] = []
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"the early-exit state may hold only tensors, found a {type(leaf).__name__}")
        if id(leaf) not in unique:
            unique[id(leaf)] = len(tensors)
            tensors.append(leaf)
    compacted = gather_rows([*tensors, positions], keep, check_index=False)
    new_leaves = [compacted[unique[id(leaf)]] for leaf in leaves]
    return pytree.tree_unflatten(new_leaves, spec), compacted[-1]


@torch.no_grad()
def early_exit(model: nn.Module, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor, *,
               criterion: str = "max_softmax", flops: Sequence[float] | None = None,
               count_flops_spent: bool = True) -> EarlyExitResult:
    """Classify ``x`` with real early exit: a sample leaves at the first exit ``k`` whose confidence
    reaches ``thresholds[k]``; only the samples still running are computed after each exit.

    Args:
        model: a staged multi-exit model in eval mode (see the module docstring), e.g. RANet.
        x: the input batch, [N, ...]; N may be 0.
        thresholds: one per exit (the last is ignored: the last exit takes everyone left) or one
            per exit but the last; +inf means nobody leaves there, -inf everybody. From
            :func:`calibrate_thresholds` or ``find_thresholds``.
        criterion: "max_softmax" (the largest softmax probability, RANet's and MSDNet's rule) or
            "entropy" (1 - entropy / log C).
        flops: cumulative multiply-adds per exit for one image; default: counted once per model and
            image size with ``count_flops`` (needs a 4-D image input).
        count_flops_spent: False skips the FLOPs report (``result.flops`` is None).

    Returns:
        :class:`EarlyExitResult`. With the same thresholds its exits and logits equal those of the
        official simulation from full forward passes, except where a confidence is within rounding
        of a threshold.
    """
    num_exits = _check_model(model)
    levels = _check_thresholds(thresholds, num_exits)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"early_exit expects an input tensor with a batch dimension, got {getattr(x, 'shape', type(x))}")
    per_exit_flops = None
    if count_flops_spent:
        if flops is None:
            if x.dim() != 4:
                raise ValueError("early_exit counts FLOPs for [N, C, H, W] images; pass flops= for other inputs "
                                 "or count_flops_spent=False")
            flops = exit_flops(model, tuple(x.shape[-2:]))
        per_exit_flops = [float(f) for f in flops]
        if len(per_exit_flops) != num_exits:
            raise ValueError(f"flops has {len(per_exit_flops)} values for {num_exits} exits")

    batch = x.shape[0]
    exit_index = torch.full((batch,), -1, dtype=torch.int64, device=x.device)
    positions = torch.arange(batch, device=x.device)
    result_logits = None
    exit_counts = [0] * num_exits
    stage_batch_sizes = [0] * num_exits
    live = batch
    state = model.early_exit_start(x)
    for k in range(num_exits):
        stage_batch_sizes[k] = live
        logits, state = model.early_exit_stage(k, state)
        if result_logits is None:
            result_logits = logits.new_empty((batch, logits.shape[1]))
        _, _, order, num_continue = exit_partition(logits, levels[k], criterion=criterion)
        scatter_exits(result_logits, exit_index, logits, order, num_continue, positions, k)
        remaining = int(num_continue) if k < num_exits - 1 else 0  # the one sync of this exit
        exit_counts[k] = live - remaining
        if remaining == 0:
            break
        if remaining < live:
            state, positions = _compact(state, order[:remaining], positions)
        live = remaining

    spent = None
    if per_exit_flops is not None:
        # Stage k costs flops[k] - flops[k-1] per sample that ran it.
        increments = [per_exit_flops[0]] + [b - a for a, b in zip(per_exit_flops, per_exit_flops[1:])]
        spent = float(sum(n * cost for n, cost in zip(stage_batch_sizes, increments)))
    return EarlyExitResult(logits=result_logits, exit_index=exit_index, exit_counts=exit_counts,
                           stage_batch_sizes=stage_batch_sizes, flops=spent)
