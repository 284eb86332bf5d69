"""Process-level setup of a training run: visible GPUs, device, DistributedDataParallel, RNG
state capture, and checkpoint-safe copies of the arguments.

A run is distributed when it was launched by ``torchrun`` (``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` are set): every process trains on its own shard of the training set
(DistributedSampler, ``--batch-size`` split evenly across the processes, like the official
DataParallel batch), per-epoch validation is sharded without padding and its sums are
all-reduced, so the figures are exact; only rank 0 writes files, and the final evaluation
(anytime + dynamic, which needs every logit in one place) runs on rank 0 alone while the
others wait. Otherwise the run is a single process on one device (no DataParallel).
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def apply_gpu_flag(args: argparse.Namespace) -> None:
    """Set CUDA_VISIBLE_DEVICES from ``--gpu`` before anything initialises CUDA, as the official
    main.py does. Under torchrun only an explicit ``--gpu`` is applied: the default '0' would
    put every process on the same GPU."""
    if args.gpu and (args.gpu_given or not launched_by_torchrun()):
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sync_buffers(self, model) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics).

        DDP broadcasts them only at the start of each training forward, after which every
        process updates them with its own batch; without this, the processes would validate
        slightly different models, none of them exactly the one rank 0 saves.
        """
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Pick the device and, under torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    distributed = launched_by_torchrun()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device} was requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as the official main.py
    if not distributed:
        return Runtime(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, **options)
    return Runtime(device=device, rank=dist.get_rank(), world_size=dist.get_world_size(), distributed=True)


def shard_loaders(train_loader: DataLoader, val_loader: DataLoader, runtime: Runtime, args,
                  ) -> tuple[DataLoader, DataLoader]:
    """Per-process copies of the training loader (DistributedSampler, batch split evenly) and of
    the validation loader (every world_size-th sample, no padding, so all-reduced sums are exact)."""
    if args.batch_size % runtime.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of "
                         f"processes ({runtime.world_size})")

    def like(loader: DataLoader, dataset, **overrides) -> DataLoader:
        options = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                       collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn,
                       drop_last=loader.drop_last)
        if loader.num_workers > 0:
            options.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
        options.update(overrides)
        return DataLoader(dataset, **options)

    train_sampler = DistributedSampler(train_loader.dataset, num_replicas=runtime.world_size,
                                       rank=runtime.rank, shuffle=True, seed=args.seed)
    train = like(train_loader, train_loader.dataset, batch_size=args.batch_size // runtime.world_size,
                 sampler=train_sampler)
    val_indices = range(runtime.rank, len(val_loader.dataset), runtime.world_size)
    val = like(val_loader, Subset(val_loader.dataset, val_indices), batch_size=val_loader.batch_size,
               shuffle=False, drop_last=False)
    return train, val


def rng_state() -> dict:
    """Every global generator's state in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _primitive(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_primitive(v) for v in value]
    return str(value)


def args_to_dict(args: argparse.Namespace) -> dict:
    """The arguments as a dict of primitives (lists for tuples, str for anything else)."""
    return {name: _primitive(value) for name, value in vars(args).items()}
