"""``python -m ranet_fast.train`` / ``ranet-train``: train, resume and evaluate RANet.

Behaves like the official RANet-pytorch ``main.py`` with the same flags (see ``args.py``):

* training writes ``<save>/save_models/checkpoint_%03d.pth.tar`` every epoch (only the latest is
  kept), ``latest.txt``, ``model_best.pth.tar`` and ``best_model_epoch.txt``, plus
  ``<save>/scores.tsv``, ``flops.pth`` and ``args.txt``; all files are written atomically;
* ``--resume`` continues from ``latest.txt`` and reproduces an uninterrupted run exactly on
  deterministic devices (CPU): every epoch re-seeds all generators from (seed, epoch);
* SIGTERM or SIGINT during training finish the current step, save
  ``save_models/interrupted.pth.tar`` and exit with status 128 + the signal number; ``--resume``
  continues from that step (see ``interrupt.py``);
* ``--evalmode anytime|dynamic|both --evaluate-from CKPT`` evaluates a checkpoint (official ones,
  with ``module.`` prefixes, load too);
* after training, a final anytime + dynamic evaluation on the test split writes
  ``AnytimeResults.txt``, ``dynamic.txt``, ``results.json`` and ``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Sequence

import torch
from torch import nn

from ranet_fast.checkpoint import CheckpointError, load_official_checkpoint, save_checkpoint, write_file_atomic

from . import cuda_graph
from .args import ArgumentError, parse_args, report_argument_error
from .evaluate import evaluate, format_summary
from .interrupt import (INTERRUPTED_CHECKPOINT, GracefulStop, TrainingInterrupted, interrupted_entry,
                        require_same_epoch_length, resumed_partial_epoch, shield_loader_workers)
from .loop import (PartialEpoch, Progress, build_optimizer, epoch_length, prepare_epoch, seed_everything,
                   train_epoch, train_step, validate)
from .runtime import (Runtime, apply_gpu_flag, args_to_dict, restore_rng_state, rng_state, setup_runtime,
                      shard_loaders)

SCORES_HEADER = "epoch\tlr\ttrain_loss\tval_loss\ttrain_prec1\tval_prec1\ttrain_prec5\tval_prec5"


def maybe_convert(model: nn.Module, fast: bool, log=print) -> nn.Module:
    """With ``--fast`` (the default), swap ranet_fast's fused layers in (``ranet_fast.convert``)."""
    if not fast:
        return model
    from ranet_fast import convert

    model = convert(model)
    converted = ", ".join(f"{n} x {name}" for name, n in sorted(model.ranet_fast_converted.items()))
    log(f"fast layers: {converted or 'none apply to this model'}")
    return model


def _model_dir(args) -> str:
    return os.path.join(args.save, "save_models")


def latest_checkpoint_path(args) -> str | None:
    """The checkpoint named by ``<save>/save_models/latest.txt``, or None when there is none.

    The official code writes the path as it was seen from its working directory; when that does
    not resolve, the file name is looked up next to ``latest.txt``.
    """
    pointer = os.path.join(_model_dir(args), "latest.txt")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as handle:
        lines = handle.read().splitlines()
    if not lines or not lines[0].strip():
        raise CheckpointError(f"'{pointer}' is empty; it should name the latest checkpoint")
    named = lines[0].strip()
    if os.path.exists(named):
        return named
    return os.path.join(_model_dir(args), os.path.basename(named))


def save_epoch(state: dict, args, epoch: int, is_best: bool, scores: list[str]) -> str:
    """Write the epoch's checkpoint, scores.tsv, the latest pointer and the best copy; remove the
    previous epoch's checkpoint. The pointer is written after the checkpoint it names."""
    model_dir = _model_dir(args)
    os.makedirs(model_dir, exist_ok=True)
    checkpoint_path = os.path.join(model_dir, "checkpoint_%03d.pth.tar" % epoch)
    save_checkpoint(state, checkpoint_path)
    write_file_atomic(os.path.join(args.save, "scores.tsv"), "\n".join(scores) + "\n")
    write_file_atomic(os.path.join(model_dir, "latest.txt"), checkpoint_path)
    if is_best:
        save_checkpoint(state, os.path.join(model_dir, "model_best.pth.tar"))
        write_file_atomic(os.path.join(model_dir, "best_model_epoch.txt"), checkpoint_path)
    # Only now that latest.txt names the new checkpoint may the older ones go.
    for stale in ("checkpoint_%03d.pth.tar" % (epoch - 1), INTERRUPTED_CHECKPOINT):
        if os.path.exists(os.path.join(model_dir, stale)):
            os.remove(os.path.join(model_dir, stale))
    return checkpoint_path


def save_interrupted(state: dict, args) -> str:
    """Write the checkpoint of an interrupted epoch and point latest.txt at it."""
    model_dir = _model_dir(args)
    path = os.path.join(model_dir, INTERRUPTED_CHECKPOINT)
    save_checkpoint(state, path)
    write_file_atomic(os.path.join(model_dir, "latest.txt"), path)
    return path


def run(args) -> dict | None:
    """Train or evaluate as the arguments say; returns the evaluation results on rank 0."""
    runtime = setup_runtime(args)
    try:
        if args.cuda_graph and args.evalmode is None:
            refusals = cuda_graph.problems(args, runtime.device, runtime.distributed)
            if refusals:
                raise ArgumentError("; ".join(refusals))
        log = print if runtime.is_main else (lambda *_: None)
        progress = Progress(enabled=runtime.is_main, print_freq=args.print_freq, log=log)
        model, flops, params = _build_model(args, runtime, log)
        loaders = _dataloaders(args, runtime)
        if args.evalmode is not None:
            return _evaluate_checkpoint(args, runtime, model, flops, params, loaders, progress)
        return _train(args, runtime, model, flops, params, loaders, progress)
    finally:
        runtime.close()


def _build_model(args, runtime: Runtime, log) -> tuple[nn.Module, list[int], int]:
    """The seeded model on the CPU, its FLOPs per exit and its parameter count."""
    from ranet_fast import count_flops
    from ranet_fast.data import image_size
    from ranet_fast.models import build_model

    seed_everything(args.seed)
    model = build_model(args)
    args.num_exits = len(model.classifier)
    flops = count_flops(model, image_size(args))
    params = sum(p.numel() for p in model.parameters())
    log(f"{args.arch} on {args.data}: {args.num_exits} exits, {params / 1e6:.2f} M parameters, "
        f"MFLOPs per exit {', '.join(f'{f / 1e6:.2f}' for f in flops)}; device {runtime.device}"
        + (f", {runtime.world_size} processes" if runtime.distributed else ""))
    return model, flops, params


def _write_run_files(args, runtime: Runtime, flops: list[int]) -> None:
    """flops.pth and args.txt (rank 0). Written only once any checkpoint to load has been loaded,
    so that a refused --resume or --evaluate-from leaves the files of an existing run alone."""
    if runtime.is_main:
        os.makedirs(args.save, exist_ok=True)
        save_checkpoint(flops, os.path.join(args.save, "flops.pth"))
        write_file_atomic(os.path.join(args.save, "args.txt"), f"{args}\n")


def _dataloaders(args, runtime: Runtime):
    """(train, val, test) loaders. Rank 0 builds its loaders first, so that only it downloads
    CIFAR or writes the --use-valid split file; the other ranks then read what it wrote."""
    from ranet_fast.data import get_dataloaders

    loaders = get_dataloaders(args) if runtime.is_main else None
    runtime.barrier()
    return loaders if runtime.is_main else get_dataloaders(args)


def _to_device(model: nn.Module, args, device: torch.device, log) -> nn.Module:
    model = maybe_convert(model, args.fast, log).to(device)
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def _evaluate_checkpoint(args, runtime: Runtime, model, flops, params, loaders, progress) -> dict | None:
    """--evalmode: the checkpoint's anytime and/or dynamic results, computed on rank 0."""
    _, val_loader, test_loader = loaders
    load_official_checkpoint(model, args.evaluate_from)
    progress.log(f"=> loaded '{args.evaluate_from}'")
    _write_run_files(args, runtime, flops)
    model = _to_device(model, args, runtime.device, progress.log)
    results = None
    if runtime.is_main:
        results = evaluate(model, mode=args.evalmode, val_loader=val_loader, test_loader=test_loader,
                           flops=flops, params=params, args=args, device=runtime.device, save_dir=args.save,
                           progress=progress, checkpoint=args.evaluate_from)
        progress.log(format_summary(results))
    runtime.barrier()
    return results


def _train(args, runtime: Runtime, model, flops, params, loaders, progress) -> dict | None:
    """The official training loop (with --resume), then the final evaluation on rank 0."""
    train_loader, val_loader, test_loader = loaders
    log, device = progress.log, runtime.device
    best_prec1, best_epoch = 0.0, 0
    scores = [SCORES_HEADER]
    checkpoint = partial = None
    if args.resume:
        resume_path = latest_checkpoint_path(args)
        if resume_path is None:
            log(f"=> no checkpoint in '{_model_dir(args)}'; starting from scratch")
        else:
            checkpoint = load_official_checkpoint(model, resume_path)
            args.start_epoch = checkpoint["epoch"] + 1
            best_prec1 = checkpoint["best_prec1"]
            best_epoch = checkpoint.get("best_epoch", checkpoint["epoch"])
            scores = list(checkpoint.get("scores", scores))
            partial = resumed_partial_epoch(checkpoint, resume_path, runtime, args)
            log(f"=> resumed from '{resume_path}' (epoch {checkpoint['epoch']}"
                + (f"; continuing epoch {args.start_epoch} at step {partial.step})" if partial else ")"))

    model = _to_device(model, args, device, log)
    optimizer = build_optimizer(args, model.parameters())
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        if "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"])

    network, epoch_val_loader = model, val_loader
    if runtime.distributed:
        train_loader, epoch_val_loader = shard_loaders(train_loader, val_loader, runtime, args)
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    graphed = None
    if args.cuda_graph:
        graphed = cuda_graph.GraphedTrainStep(model, optimizer, functools.partial(
            train_step, network, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), device=device, amp=args.amp,
            cache_casts=False))

    def state_after(epoch: int) -> dict:
        state = {
            "epoch": epoch, "arch": args.arch, "state_dict": model.state_dict(),
            "best_prec1": best_prec1, "best_epoch": best_epoch, "optimizer": optimizer.state_dict(),
            "scores": scores, "args": args_to_dict(args), "rng": rng_state(),
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    if partial is not None:
        require_same_epoch_length(partial, epoch_length(train_loader, args), resume_path)
    _write_run_files(args, runtime, flops)
    shield_loader_workers(train_loader)
    shield_loader_workers(epoch_val_loader)
    last_checkpoint = None
    with GracefulStop(runtime) as stop:
        for epoch in range(args.start_epoch, args.epochs):
            prepare_epoch(train_loader, args.seed, epoch, runtime.rank)
            train = train_epoch(network, train_loader, optimizer, epoch, args, num_exits=args.num_exits,
                                device=device, progress=progress, scaler=scaler, resume=partial,
                                stop=stop.requested, graphed=graphed)
            partial = None
            if isinstance(train, PartialEpoch):
                entry = interrupted_entry(train, epoch, runtime, args)
                if runtime.is_main:
                    last_checkpoint = save_interrupted(dict(state_after(epoch - 1), interrupted=entry), args)
                runtime.barrier()
                raise TrainingInterrupted(stop.signum, last_checkpoint)
            runtime.sync_buffers(model)
            # The unwrapped model: validation needs no gradient synchronisation.
            val = validate(model, epoch_val_loader, args, num_exits=args.num_exits, device=device,
                           progress=progress)
            scores.append(("{}\t{:.3f}" + "\t{:.4f}" * 6).format(
                epoch, train.lr, train.loss, val.loss, train.top1, val.top1[-1], train.top5, val.top5[-1]))
            is_best = val.top1[-1] > best_prec1
            if is_best:
                best_prec1, best_epoch = val.top1[-1], epoch
            log(f"epoch {epoch + 1}/{args.epochs}  lr {train.lr:.4g}  train loss {train.loss:.4f} "
                f"top-1 {train.top1:.2f}  val loss {val.loss:.4f} top-1 {val.top1[-1]:.2f}  "
                f"(best {best_prec1:.2f} at epoch {best_epoch})")
            if runtime.is_main:
                last_checkpoint = save_epoch(state_after(epoch), args, epoch, is_best, scores)
            # A signal during validation or saving: the epoch's checkpoint is complete, stop here.
            if stop.requested():
                runtime.barrier()
                raise TrainingInterrupted(stop.signum, last_checkpoint)
    log(f"Best val_prec1: {best_prec1:.4f} at epoch {best_epoch}")

    results = None
    if runtime.is_main:
        log("********** Final prediction results **********")
        results = evaluate(model, mode="both", val_loader=val_loader, test_loader=test_loader, flops=flops,
                           params=params, args=args, device=device, save_dir=args.save, progress=progress,
                           checkpoint=last_checkpoint)
        log(format_summary(results))
    runtime.barrier()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m ranet_fast.train`` and ``ranet-train``."""
    args = parse_args(argv)
    apply_gpu_flag(args)  # before anything initialises CUDA
    from ranet_fast.data import DatasetNotFoundError

    try:
        run(args)
    except ArgumentError as error:
        report_argument_error(str(error))
    except (DatasetNotFoundError, CheckpointError) as error:
        print(f"ranet-train: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except TrainingInterrupted as interrupted:
        if interrupted.checkpoint:
            print(f"ranet-train: {interrupted}; continue with --resume", file=sys.stderr)
        raise SystemExit(interrupted.exit_status) from None


if __name__ == "__main__":
    main()
