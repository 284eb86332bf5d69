"""Graceful interruption: SIGTERM and SIGINT finish the current step, save, and exit.

A cluster scheduler announces the end of a job with SIGTERM (and a grace period before
SIGKILL); a user presses Ctrl-C (SIGINT). While the trainer's epochs run, ``GracefulStop``
turns either signal into a request that the training loop reads after every step: the step in
flight completes, every process saves what it needs, rank 0 writes
``<save>/save_models/interrupted.pth.tar`` (atomically) and points ``latest.txt`` at it, and
``ranet-train`` exits with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the
shell's convention for "ended by that signal". A second SIGINT stops at once (KeyboardInterrupt);
the files on disk are then still the previous complete ones, because every write is atomic.
SIGKILL cannot be caught: it leaves the previous checkpoint, complete and readable, and at
worst a stray ``.*.tmp`` file of the write it cut short.

The interrupted checkpoint is an ordinary trainer checkpoint whose ``'epoch'`` is the last
*completed* epoch (-1 if none), so the official ``--resume`` logic (start at ``epoch + 1``)
still holds, plus an ``'interrupted'`` entry describing the unfinished epoch:

* ``epoch``, ``step`` (batches already trained), ``num_batches``, ``first_lr``;
* ``world_size`` and ``batch_size``: the data order of an epoch is a function of
  (seed, epoch, rank, world size, batch size) only (``loop.prepare_epoch``), so the checkpoint
  records *where* in that order the run stopped rather than the order itself, and a resume
  with a different process count or batch size is refused instead of silently training on a
  different sequence of batches;
* ``ranks``: for every process, its running loss/accuracy sums of the epoch and the state of
  its global random generators after the last step (gathered to rank 0).

``--resume`` then re-creates the epoch's loader order, replays the loader to ``step``, restores
the generators and continues (``loop.train_epoch``), so the resumed run's losses and weights
equal an uninterrupted run's on deterministic devices (CPU). Under torchrun every process must
stop after the same step, so the request is all-reduced after every step (one 1-element
all-reduce and a host synchronisation per step): a signal delivered to only some of the processes
stops all of them.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ranet_fast.checkpoint import CheckpointError

from .loop import PartialEpoch
from .runtime import Runtime

INTERRUPTED_CHECKPOINT = "interrupted.pth.tar"
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (None on processes other than rank 0)."""

    def __init__(self, signum: int, checkpoint: str | None):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}"
                         + (f" after saving '{checkpoint}'" if checkpoint else ""))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """While active (a context manager), SIGTERM and SIGINT only set a flag that ``requested``
    reports; the previous handlers come back on exit. Signal handlers can only be installed
    from the main thread; elsewhere this is inert and signals keep their usual effect."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            if self.runtime.is_main:
                # os.write, not print: a handler may run while print holds the stream's lock.
                os.write(2, (f"ranet-train: received {signal.Signals(signum).name}; finishing the current "
                             "step, then saving a checkpoint (press Ctrl-C again to stop at once)\n").encode())

    def requested(self) -> bool:
        """Whether any process has received a signal. Under torchrun every process must call this
        at the same point (it is a collective)."""
        flag = self.signum or 0
        if self.runtime.distributed:
            packed = torch.tensor([flag], dtype=torch.int64, device=self.runtime.device)
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
            flag = int(packed.item())
            if self.signum is None and flag:
                self.signum = flag
        return bool(flag)


def _ignore_signals(worker_init_fn):
    def init(worker_id: int) -> None:
        # Workers share the terminal's and the scheduler's process group, so they get the same
        # SIGINT/SIGTERM; left to the default they would die under the loader mid-step. The main
        # process shuts them down itself.
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if worker_init_fn is not None:
            worker_init_fn(worker_id)

    return init


def shield_loader_workers(loader: DataLoader) -> None:
    """Make ``loader``'s worker processes ignore SIGINT and SIGTERM (see ``_ignore_signals``)."""
    if loader.num_workers > 0:
        loader.worker_init_fn = _ignore_signals(loader.worker_init_fn)


def interrupted_entry(partial: PartialEpoch, epoch: int, runtime: Runtime, args) -> dict | None:
    """The checkpoint's ``'interrupted'`` entry on rank 0 (None elsewhere). A collective under torchrun:
    every process contributes its running sums and generator states."""
    own = {"totals": partial.totals, "rng": partial.rng}
    if runtime.distributed:
        ranks: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(ranks, own)
    else:
        ranks = [own]
    if not runtime.is_main:
        return None
    return {"epoch": epoch, "step": partial.step, "num_batches": partial.num_batches,
            "first_lr": partial.first_lr, "world_size": runtime.world_size, "batch_size": args.batch_size,
            "ranks": ranks}


def resumed_partial_epoch(checkpoint: dict, path: str, runtime: Runtime, args) -> PartialEpoch | None:
    """This process's ``PartialEpoch`` from an interrupted checkpoint; None for an end-of-epoch one.
    Raises ``CheckpointError`` (naming ``path``) when the run cannot continue the epoch exactly."""
    entry = checkpoint.get("interrupted")
    if entry is None:
        return None
    if entry["epoch"] != checkpoint["epoch"] + 1:
        raise CheckpointError(f"checkpoint '{path}' is inconsistent: it was interrupted in epoch {entry['epoch']} "
                              f"but its last completed epoch is {checkpoint['epoch']}")
    if (entry["world_size"], entry["batch_size"]) != (runtime.world_size, args.batch_size):
        raise CheckpointError(
            f"checkpoint '{path}' stopped at step {entry['step']} of epoch {entry['epoch']} with "
            f"{entry['world_size']} process(es) and --batch-size {entry['batch_size']}; continuing that epoch "
            f"exactly needs the same, but this run has {runtime.world_size} and {args.batch_size}")
    own = entry["ranks"][runtime.rank]
    return PartialEpoch(step=entry["step"], num_batches=entry["num_batches"], first_lr=entry["first_lr"],
                        totals=own["totals"], rng=own["rng"])


def require_same_epoch_length(partial: PartialEpoch, num_batches: int, path: str) -> None:
    """Raises ``CheckpointError`` (naming ``path``) unless this run's epochs have the interrupted
    epoch's length: another ``--max-steps-per-epoch`` or data set would change the batches."""
    if partial.num_batches != num_batches:
        raise CheckpointError(
            f"checkpoint '{path}' stopped at step {partial.step} of an epoch of {partial.num_batches} batches, "
            f"but this run's epochs have {num_batches} (another --max-steps-per-epoch or data set?); "
            "continuing that epoch exactly needs the same")
