"""Early exit on a torchvision backbone: attach exits, convert, train with the trainer's loop, exit early.

    python examples/backbone_early_exit.py                     # a few minutes on a laptop CPU
    python examples/backbone_early_exit.py --train-samples 64 --val-samples 64 --test-samples 64 \
        --epochs 1 --blocks 1 --width 8                        # seconds (what CI runs)

The backbone is torchvision's ResNet (``--blocks`` BasicBlocks per stage, ``--width`` channels in
the first stage; ``--blocks 2 --width 64`` is resnet18). ``ranet_fast.nn.attach_exits`` puts a
classifier after each of its four stages and returns a model with the staged interface of
``ranet_fast.inference.early_exit``; ``ranet_fast.convert`` fuses its conv/BN chains. It is trained
on the synthetic data set with the trainer's ``train_epoch``/``validate``, thresholds are
calibrated on validation logits for the budget parameter ``--p``, and the test images are
classified with real early exit. The realised speed-up is the time of the full network (every
image through every stage) over the time of early exit on the same images, medians of
interleaved repeats; the FLOPs ratio is what it would be without overheads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torchvision.models.resnet import BasicBlock, ResNet

import ranet_fast
from ranet_fast.inference import calibrate_thresholds, early_exit, exit_flops
from ranet_fast.nn import attach_exits
from ranet_fast.train.loop import Progress, build_optimizer, train_epoch, validate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from custom_early_exit import NUM_CLASSES, loader  # noqa: E402 - the sibling example's data loaders


def tiny_resnet(blocks: int, width: int) -> ResNet:
    """torchvision's ResNet with ``blocks`` BasicBlocks per stage and ``width`` channels in the first."""
    model = ResNet(BasicBlock, [blocks] * 4, num_classes=NUM_CLASSES, width_per_group=64)
    if width == 64:
        return model
    # Narrower: the same architecture built with fewer channels per stage.
    model.inplanes = width
    model.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(width)
    for index, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        setattr(model, name, model._make_layer(BasicBlock, width * 2 ** index, blocks, stride=1 if index == 0 else 2))
    return model


def interleaved_seconds(calls: dict, repeats: int) -> dict:
    """Median seconds of each call over ``repeats`` rounds, the calls timed in turn in every round."""
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1, help="BasicBlocks per ResNet stage")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--val-samples", type=int, default=1024)
    parser.add_argument("--test-samples", type=int, default=1024)
    parser.add_argument("--p", type=float, default=1.0, help="budget parameter (exit fractions ~ p^k)")
    parser.add_argument("--repeats", type=int, default=7, help="timing rounds for the realised speed-up")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)

    torch.manual_seed(options.seed)
    device = torch.device("cpu")
    model = attach_exits(tiny_resnet(options.blocks, options.width), after=["layer1", "layer2", "layer3", "layer4"],
                         num_classes=NUM_CLASSES)
    ranet_fast.convert(model, verbose=True)

    # The fields of the trainer's flags that train_epoch and validate read.
    args = argparse.Namespace(lr=options.lr, lr_type="cosine", epochs=options.epochs, data="synthetic",
                              decay_rate=0.1, max_steps_per_epoch=None, print_freq=10**9, channels_last=False,
                              amp="none", optimizer="sgd", momentum=0.9, weight_decay=1e-4)
    train = loader("train", options.train_samples, options.batch_size, True, options.seed)
    val = loader("val", options.val_samples, options.batch_size, False, options.seed)
    test = loader("test", options.test_samples, options.test_samples, False, options.seed)
    optimizer = build_optimizer(args, model.parameters())
    progress = Progress(enabled=True, print_freq=args.print_freq)
    for epoch in range(options.epochs):
        stats = train_epoch(model, train, optimizer, epoch, args, num_exits=model.num_exits, device=device,
                            progress=progress)
        checked = validate(model, val, args, num_exits=model.num_exits, device=device, progress=progress)
        print(f"epoch {epoch}: train loss {stats.loss:.3f}, validation top-1 per exit "
              + " ".join(f"{top1:.1f}%" for top1 in checked.top1))

    model.eval()
    with torch.no_grad():
        val_logits = torch.cat([torch.stack(model(images)) for images, _ in val], dim=1)  # [K, N, C]
    images, labels = next(iter(test))
    flops = exit_flops(model, tuple(images.shape[-2:]))
    thresholds = calibrate_thresholds(val_logits, flops, p=options.p).thresholds
    result = early_exit(model, images, thresholds)
    with torch.no_grad():
        seconds = interleaved_seconds({"full": lambda: model(images),
                                       "early_exit": lambda: early_exit(model, images, thresholds)}, options.repeats)
    summary = {
        "exit_counts": result.exit_counts,
        "early_exit_top1": (result.logits.argmax(1) == labels).float().mean().item() * 100,
        "flops_per_image": result.flops_per_image,
        "full_flops_per_image": flops[-1],
        "flops_speedup": flops[-1] / result.flops_per_image,
        "realised_speedup": seconds["full"] / seconds["early_exit"],
        "seconds": seconds,
        "converted": model.ranet_fast_converted,
    }
    print(f"early exit at p = {options.p}: {len(labels)} test images left at the exits {result.exit_counts}, "
          f"top-1 {summary['early_exit_top1']:.1f}%; {summary['flops_speedup']:.2f}x fewer FLOPs than the full "
          f"network, {summary['realised_speedup']:.2f}x faster measured (medians of {options.repeats} interleaved runs)")
    print("summary " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
