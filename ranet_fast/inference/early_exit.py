"""Real early-exit inference: samples that are confident enough leave, the rest run on, compacted.

The official RANet/MSDNet code only *simulates* budgeted inference from full forward passes. Here
the network really stops computing for the samples that have left: after every exit the engine

1. decides who leaves (confidence >= threshold), writes the leaving samples' logits and exit
   index into the batch result at their original positions, and puts the samples that continue
   first in a stable order with their count, all on the device, in one call of
   ``exit_partition_scatter`` (one pass over the logits; on CUDA two launches),
2. reads the number that continue (the one device-to-host synchronisation per exit) and
3. compacts every tensor the rest of the network still needs with one ``gather_rows`` launch.

A stage nobody leaves at costs no copy; once nobody is left, no later stage runs. With
``host_syncs="once"`` (CUDA) the engine instead decides every exit on the device and runs every
stage on the whole batch, reading the exit counts back once at the end.

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
from ranet_fast.ops import _registry
from ranet_fast.ops.exit_confidence import validate_logits
from ranet_fast.ops.exit_partition import SCATTER_SPEC as _PARTITION_SCATTER
from ranet_fast.ops.gather_rows import SPEC as _GATHER
from ranet_fast.ops.gather_rows import is_row_dense, output_strides

CRITERIA = ("max_softmax", "entropy")
HOST_SYNCS = ("per_exit", "once")


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


def _structure(node, leaves: list[torch.Tensor]):
    """Appends the tensors of a state made of dicts, lists and tuples to ``leaves`` and returns its
    shape for :func:`_rebuild` (None stands for a tensor); raises _NotPlain for any other node.

    Written out rather than torch's pytree, which spends about 70 us flattening and rebuilding
    a RANet state: more than the rest of an exit's bookkeeping.
    """
    if isinstance(node, torch.Tensor):
        leaves.append(node)
        return None
    kind = type(node)
    if kind is dict:
        return kind, tuple(node), tuple(_structure(value, leaves) for value in node.values())
    if kind is list or kind is tuple:
        return kind, None, tuple(_structure(value, leaves) for value in node)
    raise _NotPlain


class _NotPlain(Exception):
    """A state node other than a tensor, dict, list or tuple: torch's pytree handles that state."""


def _rebuild(shape, leaves):
    """The state of ``shape`` (from :func:`_structure`) holding the tensors of the iterator ``leaves``."""
    if shape is None:
        return next(leaves)
    kind, keys, children = shape
    values = [_rebuild(child, leaves) for child in children]
    return dict(zip(keys, values)) if kind is dict else kind(values)


def _flatten(state):
    """(tensors, rebuild): the state's leaves and a function building the same state from new ones."""
    leaves: list[torch.Tensor] = []
    try:
        shape = _structure(state, leaves)
        return leaves, lambda new: _rebuild(shape, iter(new))
    except _NotPlain:
        leaves, spec = pytree.tree_flatten(state)
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"the early-exit state may hold only tensors, found a {type(leaf).__name__}") from None
        return leaves, lambda new: pytree.tree_unflatten(list(new), spec)


def _view_of(base: torch.Tensor, view: torch.Tensor, row_numel: int) -> int | None:
    """Where ``view`` starts in each row of ``base`` (in elements) if every row of ``view`` lies in
    the same row of the row-dense ``base`` (then a copy of ``base``'s rows holds it at the same
    place), else None."""
    if view.dtype != base.dtype or view.shape[0] != base.shape[0] or view.stride(0) != base.stride(0):
        return None
    offset = view.storage_offset() - base.storage_offset()
    last = offset + sum((size - 1) * stride for size, stride in zip(view.shape[1:], view.stride()[1:]))
    if offset < 0 or last >= row_numel:
        return None
    return offset


def _copy_plan(leaves: list[torch.Tensor]):
    """The tensors to copy for ``leaves`` and, per leaf, how to find it among the copies.

    Views of one buffer (a converted dense block's per-layer outputs are prefix views of its
    buffer, and the block's output is the buffer itself) are copied once, as the buffer, when the
    buffer is no larger than the views together: without this, C-1's state after its third exit
    is copied 2.6 times over. A tensor reachable twice is copied once and stays shared.
    Returns (sources, recipes): recipe (i, None) is copy i itself; (i, (shape, strides, offset))
    a view of copy i with those per-row shape and strides starting ``offset`` elements into a row.
    """
    groups: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
    for leaf in leaves:
        base = leaf if leaf._base is None else leaf._base
        groups.setdefault(id(base), (base, {}))[1][id(leaf)] = leaf
    sources: list[torch.Tensor] = []
    recipe_of: dict[int, tuple] = {}
    for base, members in groups.values():
        offsets = None
        if len(members) > 1 or id(base) not in members:
            dense = output_strides(base.shape, base.stride())
            row_numel = dense[0]
            if is_row_dense(base) and base.stride()[1:] == dense[1:] and \
                    row_numel <= sum(member[0].numel() for member in members.values()):
                offsets = {key: _view_of(base, member, row_numel) for key, member in members.items()}
                if None in offsets.values():
                    offsets = None
        if offsets is None:
            for key, member in members.items():
                recipe_of[key] = (len(sources), None)
                sources.append(member)
            continue
        for key, member in members.items():
            recipe_of[key] = (len(sources), None if member is base else
                              (tuple(member.shape[1:]), member.stride()[1:], offsets[key]))
        sources.append(base)
    return sources, [recipe_of[id(leaf)] for leaf in leaves]


def _compact(state, keep: torch.Tensor, positions: torch.Tensor, gather):
    """Every tensor of ``state`` and ``positions`` restricted to the rows ``keep``, in one ``gather``."""
    leaves, rebuild = _flatten(state)
    sources, recipes = _copy_plan(leaves)
    copies = gather([*sources, positions], keep, False)
    rows = keep.shape[0]
    new_leaves = []
    for position, view in recipes:
        copy = copies[position]
        if view is not None:
            shape, strides, offset = view
            copy = copy.as_strided((rows, *shape), (copy.stride(0), *strides), copy.storage_offset() + offset)
        new_leaves.append(copy)
    return rebuild(new_leaves), copies[-1]

class _ExitOps:
    """The exit ops' implementations for one engine call, chosen once from its first exit's
    tensors (``_registry.choose_backend``, as each op's public function would choose per call).

    The engine calls them directly: their arguments are the engine's own tensors, whose shapes,
    dtypes and devices it fixed itself, so the public functions' per-call validation and backend
    choice (about 45 us per exit together on a CPU) would only repeat what is known.
    """

    def __init__(self):
        self.partition_scatter = None
        self.gather = None

    def partition_and_scatter(self, logits, threshold, criterion, positions, exit_index, result_logits, result_exit):
        """exit_partition_scatter: (order, num_continue), the leavers written into the results."""
        args = (logits, threshold, criterion, positions, exit_index, result_logits, result_exit)
        if self.partition_scatter is None:
            self.partition_scatter = _chosen(_PARTITION_SCATTER, *args)
        return self.partition_scatter(*args)

    def gather_rows(self, tensors, index, check_index):
        if self.gather is None:
            self.gather = _chosen(_GATHER, tensors, index, check_index)
        return self.gather(tensors, index, check_index)


def _chosen(spec, *args):
    return _registry.implementation(spec, _registry.choose_backend(spec, None, args))


def _check_logits(logits: object, exit_index: int, rows: int, first: torch.Tensor | None) -> None:
    """The stage's logits must be [rows, C] like the first exit's (checked in full once)."""
    if first is None:
        validate_logits(logits, op_name=f"early_exit (the logits of exit {exit_index})")
    elif not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != first.shape[1] \
            or logits.dtype != first.dtype or logits.device != first.device:
        raise ValueError(f"early_exit: exit {exit_index} returned logits {getattr(logits, 'shape', logits)}; every "
                         f"exit must return [N, {first.shape[1]}] {first.dtype} logits on {first.device}")
    if logits.shape[0] != rows:
        raise ValueError(f"early_exit: exit {exit_index} returned logits for {logits.shape[0]} samples, "
                         f"but {rows} ran the stage")


@torch.no_grad()
def early_exit(model: nn.Module, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor, *,
               criterion: str = "max_softmax", flops: Sequence[float] | None = None,
               count_flops_spent: bool = True, host_syncs: str = "per_exit") -> EarlyExitResult:
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
        host_syncs: "per_exit" (the default): after each exit the engine reads how many samples
            go on and compacts the batch, so later stages run only for them. "once" (CUDA
            only): every exit is decided on the device and every stage runs on the whole batch
            (the samples that left are computed on and ignored); the one device-to-host read is
            the exit counts at the end. It saves the per-exit synchronisation, not computation:
            for small batches on a GPU, where a stage costs about the same for any batch size.

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
    if host_syncs not in HOST_SYNCS:
        raise ValueError(f"host_syncs must be one of {', '.join(HOST_SYNCS)}, got {host_syncs!r}")
    if host_syncs == "once" and x.device.type != "cuda":
        raise ValueError(f"host_syncs='once' is for CUDA inputs, where a host read stalls the GPU; x is on {x.device}, "
                         "where the default 'per_exit' costs no such stall and skips the work of the samples that left")
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

    run = _run_deciding_on_device if host_syncs == "once" else _run_compacting
    logits, exit_index, exit_counts, stage_batch_sizes = run(model, x, levels, criterion)
    spent = None
    if per_exit_flops is not None:
        # Stage k costs flops[k] - flops[k-1] per sample that ran it.
        increments = [per_exit_flops[0]] + [b - a for a, b in zip(per_exit_flops, per_exit_flops[1:])]
        spent = float(sum(n * cost for n, cost in zip(stage_batch_sizes, increments)))
    return EarlyExitResult(logits=logits, exit_index=exit_index, exit_counts=exit_counts,
                           stage_batch_sizes=stage_batch_sizes, flops=spent)


def _run_compacting(model, x: torch.Tensor, levels: list[float], criterion: str):
    """The default engine: one host read per exit, then the continuing samples are compacted."""
    num_exits, batch = len(levels), x.shape[0]
    exit_counts = [0] * num_exits
    stage_batch_sizes = [0] * num_exits
    result_logits = result_exit = positions = first_logits = ops = None
    live = batch
    state = model.early_exit_start(x)
    for k in range(num_exits):
        stage_batch_sizes[k] = live
        logits, state = model.early_exit_stage(k, state)
        _check_logits(logits, k, live, first_logits)
        if first_logits is None:
            first_logits = logits
            # Allocated on the logits' device: a model may move the batch (e.g. a staged pipeline).
            result_logits = logits.new_empty((batch, logits.shape[1]))
            result_exit = torch.empty(batch, dtype=torch.int64, device=logits.device)
            positions = torch.arange(batch, device=logits.device)
            ops = _ExitOps()
        if k == num_exits - 1:
            # The last exit takes everyone left: no decision, one copy into place.
            if live == batch:  # nobody left earlier: the rows are already in batch order
                result_logits.copy_(logits)
                result_exit.fill_(k)
            else:
                result_logits.index_copy_(0, positions, logits)
                result_exit.index_fill_(0, positions, k)
            exit_counts[k] = live
            break
        order, num_continue = ops.partition_and_scatter(logits, levels[k], criterion, positions, k, result_logits,
                                                        result_exit)
        remaining = int(num_continue)  # the one host read of this exit
        exit_counts[k] = live - remaining
        if remaining == 0:
            break  # nobody is left: no later stage runs
        if remaining < live:  # an exit nobody leaves at copies nothing
            state, positions = _compact(state, order[:remaining], positions, ops.gather_rows)
            live = remaining
    return result_logits, result_exit, exit_counts, stage_batch_sizes


def _run_deciding_on_device(model, x: torch.Tensor, levels: list[float], criterion: str):
    """host_syncs="once": every stage runs on the whole batch, every exit is decided on the device.

    A sample that has left keeps being computed (rows do not interact in eval mode), but its
    position is redirected to a scratch row ``batch`` of the results, so later exits' writes of
    it land there and are dropped. Nothing is read back until the exit counts at the end.
    Runs on any device (tests run it on a CPU); ``early_exit`` offers it for CUDA only.
    """
    num_exits, batch = len(levels), x.shape[0]
    result_logits = result_exit = positions = first_logits = ops = None
    state = model.early_exit_start(x)
    for k in range(num_exits):
        logits, state = model.early_exit_stage(k, state)
        _check_logits(logits, k, batch, first_logits)
        if first_logits is None:
            first_logits = logits
            result_logits = logits.new_empty((batch + 1, logits.shape[1]))
            result_exit = torch.empty(batch + 1, dtype=torch.int64, device=logits.device)
            positions = torch.arange(batch, device=logits.device)
            slots = torch.arange(batch, device=logits.device)
            ops = _ExitOps()
        if k == num_exits - 1:
            # Everyone still running leaves here (those who left before write the scratch row).
            result_logits.index_copy_(0, positions, logits)
            result_exit.index_fill_(0, positions, k)
            break
        # A sample that left before may leave again or continue: either way its writes go to the
        # scratch row, and its position stays there.
        order, num_continue = ops.partition_and_scatter(logits, levels[k], criterion, positions, k, result_logits,
                                                        result_exit)
        slot_leaves = slots >= num_continue
        leaves_now = torch.empty_like(slot_leaves).scatter_(0, order, slot_leaves)
        positions = positions.masked_fill(leaves_now, batch)
    exit_index = result_exit[:batch]
    # Counted by comparison, not bincount, which reads its maximum back first on CUDA.
    per_exit = (exit_index.unsqueeze(1) == torch.arange(num_exits, device=exit_index.device)).sum(dim=0)
    exit_counts = per_exit.tolist()  # the one host read
    return result_logits[:batch], exit_index, exit_counts, [batch] * num_exits
