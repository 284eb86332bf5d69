"""One training epoch and one validation pass over a multi-exit network, as in the official main.py.

The loss is the sum of the cross-entropy of every exit; accuracy is tracked for every exit and the
last exit's figures are the ones reported per epoch (official scores.tsv). The learning rate is set
before every batch with the official ``adjust_learning_rate`` rule. Statistics are kept as exact
sums (correct predictions, summed loss, sample count) on the device so the GPU is synchronised
only when a line is printed, and so that under DistributedDataParallel they can be all-reduced.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .runtime import restore_rng_state, rng_state


def learning_rate(args, epoch: int, batch: int, num_batches: int) -> float:
    """The official schedule (main.py ``adjust_learning_rate``) at ``batch`` of ``epoch``.

    cosine: half-cosine from ``lr`` to 0 over all batches of all epochs. multistep: CIFAR-style
    data (cifar10/100, synthetic) multiplies ``lr`` by ``decay_rate`` from 50% of the epochs and
    by ``decay_rate**2`` from 75%; ImageNet multiplies it by ``decay_rate`` every 30 epochs. The
    official code hard-codes 0.1 there, which is the ``--decay-rate`` default.
    """
    if args.lr_type == "cosine":
        total = args.epochs * num_batches
        current = (epoch % args.epochs) * num_batches + batch
        return 0.5 * args.lr * (1 + math.cos(math.pi * current / total))
    if args.data == "ImageNet":
        return args.lr * args.decay_rate ** (epoch // 30)
    if epoch >= args.epochs * 0.75:
        return args.lr * args.decay_rate ** 2
    if epoch >= args.epochs * 0.5:
        return args.lr * args.decay_rate
    return args.lr


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(args, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by ``--optimizer`` with ``--lr``, ``--momentum`` and ``--weight-decay``.

    The official code accepts the flag but always builds SGD; sgd is the default here too.
    """
    if args.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=args.lr, momentum=args.momentum,
                                   weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)
    raise ValueError(f"unknown --optimizer {args.optimizer!r}")


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, epoch, rank), well mixed by numpy's SeedSequence."""
    words = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_epoch(loader: DataLoader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make everything random in ``epoch`` a function of (seed, epoch, rank) only.

    That is what lets ``--resume`` reproduce an uninterrupted run exactly. The global
    generators (model randomness and, for a loader without its own generator, the worker
    processes' seeds, drawn when the epoch's iterator is created) are re-seeded, and
    ``ranet_fast.data.set_epoch`` re-seeds the generators the loader and its sampler own (or
    calls a DistributedSampler's ``set_epoch``).
    """
    from ranet_fast.data import set_epoch

    seed_everything(epoch_seed(seed, epoch, rank))
    set_epoch(loader, epoch, seed)


class _Totals:
    """Exact running sums for a multi-exit pass, kept on the device (no per-batch sync)."""

    def __init__(self, num_exits: int, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct1 = torch.zeros(num_exits, dtype=torch.float64, device=device)
        self.correct5 = torch.zeros(num_exits, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, outputs: Sequence[torch.Tensor], target: torch.Tensor, loss: torch.Tensor) -> None:
        batch = target.size(0)
        self.loss += loss.detach().double() * batch
        k = min(5, outputs[0].size(1))
        for index, output in enumerate(outputs):
            top = output.detach().topk(k, dim=1).indices
            hits = top.eq(target.unsqueeze(1))
            self.correct1[index] += hits[:, 0].sum()
            self.correct5[index] += hits.any(dim=1).sum()
        self.count += batch

    def all_reduce(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.loss.device)
        packed = torch.cat([self.loss.view(1), self.correct1, self.correct5, count])
        dist.all_reduce(packed)
        exits = self.correct1.numel()
        self.loss = packed[0]
        self.correct1 = packed[1:1 + exits]
        self.correct5 = packed[1 + exits:1 + 2 * exits]
        self.count = int(packed[-1].item())

    def state_dict(self) -> dict:
        """The running sums, for a checkpoint of an interrupted epoch."""
        return {"loss": self.loss.cpu(), "correct1": self.correct1.cpu(), "correct5": self.correct5.cpu(),
                "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        device = self.loss.device
        self.loss = state["loss"].to(device)
        self.correct1 = state["correct1"].to(device)
        self.correct5 = state["correct5"].to(device)
        self.count = int(state["count"])

    def averages(self) -> tuple[float, list[float], list[float]]:
        count = max(self.count, 1)
        return (self.loss.item() / count,
                (self.correct1 * 100.0 / count).tolist(),
                (self.correct5 * 100.0 / count).tolist())


@dataclass
class TrainStats:
    loss: float
    top1: float  # last exit, percent
    top5: float
    lr: float  # learning rate at the first batch of the epoch (official scores.tsv)


@dataclass
class PartialEpoch:
    """Where an interrupted training epoch stopped, from one process's point of view.

    Together with the model, optimizer and scaler state this is what continuing the epoch
    exactly needs: the data order is a function of (seed, epoch, rank, world size) only (see
    ``prepare_epoch``), so ``step`` says where in it to continue; ``totals`` are the epoch's
    running loss/accuracy sums so far, so the epoch's reported figures come out the same;
    ``rng`` is every global generator's state after the last trained step.
    """

    step: int  # batches of the epoch already trained
    num_batches: int  # the epoch's length (loader length capped by --max-steps-per-epoch)
    first_lr: float
    totals: dict  # _Totals.state_dict()
    rng: dict  # runtime.rng_state()


def epoch_length(loader: DataLoader, args) -> int:
    """Batches per training epoch: the loader's length, capped by ``--max-steps-per-epoch``."""
    if args.max_steps_per_epoch is None:
        return len(loader)
    return min(len(loader), args.max_steps_per_epoch)


@dataclass
class ValidationStats:
    loss: float
    top1: list[float]  # per exit, percent
    top5: list[float]


@dataclass
class Progress:
    """How a pass reports progress: a tqdm bar on a terminal, else the official lines every N batches."""

    enabled: bool  # False on every process but rank 0
    print_freq: int
    log: Callable[[str], None] = print

    def bar(self, iterable, total: int, desc: str):
        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False,
                    disable=not (self.enabled and sys.stderr.isatty()))

    def lines(self, bar) -> bool:
        return self.enabled and bar.disable


def _as_list(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


def _autocast(device: torch.device, amp: str, cache_casts: bool = True):
    if amp == "none":
        return contextlib.nullcontext()
    # A CUDA graph capture must not keep autocast's cached weight casts (cache_casts=False).
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                          cache_enabled=cache_casts)


def _to_device(images: torch.Tensor, target: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target.to(device, non_blocking=True)


def train_step(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, optimizer: torch.optim.Optimizer,
               criterion: nn.Module, device: torch.device, amp: str, scaler: torch.amp.GradScaler | None = None,
               cache_casts: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One training step: the forward under ``--amp``, the sum of every exit's loss, backward and the
    optimizer step; returns (per-exit logits, loss). ``--cuda-graph`` captures exactly this."""
    with _autocast(device, amp, cache_casts):
        outputs = _as_list(model(images))
        loss = sum(criterion(output.float(), target) for output in outputs)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return outputs, loss


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, epoch: int, args, *,
                num_exits: int, device: torch.device, progress: Progress,
                scaler: torch.amp.GradScaler | None = None, resume: PartialEpoch | None = None,
                stop: Callable[[], bool] | None = None,
                graphed: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None) -> TrainStats | PartialEpoch:
    """Train ``model`` for one epoch (at most ``args.max_steps_per_epoch`` batches).

    ``stop`` is asked after every step; when it answers True the epoch ends there and a
    ``PartialEpoch`` is returned instead of the statistics. ``resume`` continues such an
    epoch: the loader (already prepared for this epoch by ``prepare_epoch``) is replayed up
    to ``resume.step`` by drawing and discarding its batches, which reproduces the data order,
    the augmentation draws and the worker processes' generator states exactly whatever
    ``--workers`` is, at the cost of loading those batches (no forward or backward). The
    global generators are then set to ``resume.rng``, the state after the interrupted run's
    last step, so that anything the model draws continues as it would have.

    ``graphed`` (``--cuda-graph``: a :class:`ranet_fast.train.cuda_graph.GraphedTrainStep`) runs
    the steps instead of :func:`train_step`; it is settled before the epoch returns.
    """
    criterion = nn.CrossEntropyLoss()
    step_fn = graphed or functools.partial(train_step, model, optimizer=optimizer, criterion=criterion, device=device,
                                           amp=args.amp, scaler=scaler)
    num_batches = epoch_length(loader, args)
    totals = _Totals(num_exits, device)
    first_lr = None
    start = 0
    iterator = iter(loader)
    if resume is not None:
        if resume.num_batches != num_batches:
            raise ValueError(f"cannot continue epoch {epoch} at step {resume.step}: it had {resume.num_batches} "
                             f"batches and has {num_batches} now (--batch-size, --max-steps-per-epoch, the "
                             "data set and the number of processes must stay the same)")
        start = resume.step
        for _ in range(start):
            next(iterator)
        totals.load_state_dict(resume.totals)
        first_lr = resume.first_lr
        restore_rng_state(resume.rng)
    batch_time = data_time = 0.0
    model.train()
    end = time.perf_counter()
    bar = progress.bar(itertools.islice(iterator, num_batches - start), num_batches - start, f"epoch {epoch}")
    for step, (images, target) in enumerate(bar, start=start):
        lr = learning_rate(args, epoch, step, num_batches)
        set_learning_rate(optimizer, lr)
        first_lr = lr if first_lr is None else first_lr
        data_time += time.perf_counter() - end

        images, target = _to_device(images, target, device, args.channels_last)
        outputs, loss = step_fn(images, target)
        totals.update(outputs, target, loss)

        batch_time += time.perf_counter() - end
        end = time.perf_counter()
        if step % args.print_freq == 0 or step == num_batches - 1:
            loss_value = loss.item()
            top1_last = totals.correct1[-1].item() * 100.0 / totals.count
            if progress.lines(bar):
                timed = step + 1 - start
                progress.log(f"Epoch: [{epoch}][{step + 1}/{num_batches}]\t"
                             f"Time {batch_time / timed:.3f}\tData {data_time / timed:.3f}\t"
                             f"Loss {loss_value:.4f}\tAcc@1 {top1_last:.4f}")
            else:
                bar.set_postfix(loss=f"{loss_value:.3f}", acc1=f"{top1_last:.2f}", lr=f"{lr:.4g}")
        if stop is not None and stop():
            bar.close()
            if graphed is not None:
                graphed.settle()
            return PartialEpoch(step=step + 1, num_batches=num_batches, first_lr=first_lr,
                                totals=totals.state_dict(), rng=rng_state())
    bar.close()
    if graphed is not None:
        graphed.settle()
    if totals.count == 0:
        raise RuntimeError("the training loader produced no batches; is the training set empty?")
    totals.all_reduce()
    loss_avg, top1, top5 = totals.averages()
    return TrainStats(loss=loss_avg, top1=top1[-1], top5=top5[-1], lr=first_lr)


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, args, *, num_exits: int, device: torch.device,
             progress: Progress) -> ValidationStats:
    """Loss (sum over exits) and per-exit top-1/top-5 over ``loader``, summed over all processes."""
    criterion = nn.CrossEntropyLoss()
    totals = _Totals(num_exits, device)
    model.eval()
    bar = progress.bar(loader, len(loader), "validate")
    for step, (images, target) in enumerate(bar):
        images, target = _to_device(images, target, device, args.channels_last)
        with _autocast(device, args.amp):
            outputs = _as_list(model(images))
            loss = sum(criterion(output.float(), target) for output in outputs)
        totals.update(outputs, target, loss)
        if progress.lines(bar) and step % args.print_freq == 0:
            progress.log(f"Test: [{step + 1}/{len(loader)}]\tLoss {loss.item():.4f}\t"
                         f"Acc@1 {totals.correct1[-1].item() * 100.0 / totals.count:.4f}")
    bar.close()
    totals.all_reduce()
    loss_avg, top1, top5 = totals.averages()
    return ValidationStats(loss=loss_avg, top1=top1, top5=top5)
