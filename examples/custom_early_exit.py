"""Your own early-exit network with ranet_fast: fast layers, the trainer's loop, real early exit.

    python examples/custom_early_exit.py                       # a minute or two on a laptop CPU
    python examples/custom_early_exit.py --train-samples 64 --val-samples 64 --test-samples 64 \
        --epochs 1 --width 4                                   # seconds (what CI runs)

The network is three stages, each ending in an exit (a classifier):

    stem: conv -> BN -> ReLU (a plain nn.Sequential, which ranet_fast.convert fuses)
    stage k: [a stride-2 conv -> BN -> ReLU for k > 0] -> a dense block (ranet_fast.nn.FastBlockNormal:
             RANet's dense layers, concat-free in eval mode) -> exit k

It exposes the staged interface of ``ranet_fast.inference.early_exit`` (``num_exits``,
``early_exit_start``, ``early_exit_stage``) and builds ``forward`` on it, so training, evaluation and
early exit all run the same computation. It is trained on the synthetic data set with the trainer's
``train_epoch``/``validate``, thresholds are calibrated on validation logits for a budget and the
test images are classified with real early exit: the images that leave at an exit are not computed
any further.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms

import ranet_fast
from ranet_fast.data.synthetic import SyntheticShapes
from ranet_fast.inference import calibrate_thresholds, early_exit, exit_flops
from ranet_fast.nn import FastBlockNormal
from ranet_fast.train.loop import Progress, build_optimizer, train_epoch, validate

NUM_CLASSES = 10


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TinyEarlyExitNet(nn.Module):
    """A three-exit CNN: stem, then per stage an optional downsampling conv, a dense block and an exit."""

    def __init__(self, width: int = 8, growth: int = 4, layers_per_block: int = 2, num_exits: int = 3):
        super().__init__()
        self.stem = conv_bn_relu(3, width, stride=1)
        self.down = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()  # count_flops marks one exit per classifier module
        channels = width
        for k in range(num_exits):
            if k > 0:
                self.down.append(conv_bn_relu(channels, channels, stride=2))
            # A dense block with a 1x1 transition halving its output channels (RANet's _BlockNormal).
            block = FastBlockNormal(layers_per_block, channels, growth, 0.5, True, 2)
            self.blocks.append(block)
            channels = block.trans.net[0].out_channels
            self.classifier.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, NUM_CLASSES)))

    # The staged interface of ranet_fast.inference.early_exit -----------------------------------

    @property
    def num_exits(self) -> int:
        return len(self.classifier)

    def early_exit_start(self, x: torch.Tensor) -> dict:
        """Everything before the first stage. The state holds only what later stages read, with
        the batch in dim 0: the engine compacts all of it when images leave."""
        return {"features": self.stem(x)}

    def early_exit_stage(self, k: int, state: dict) -> tuple[torch.Tensor, dict]:
        """From after exit k - 1 through exit k: (exit k's logits, the state for stage k + 1)."""
        x = state["features"]
        if k > 0:
            x = self.down[k - 1](x)
        x, _ = self.blocks[k](x)
        logits = self.classifier[k](x)
        return logits, ({"features": x} if k < self.num_exits - 1 else {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state = self.early_exit_start(x)
        outputs = []
        for k in range(self.num_exits):
            logits, state = self.early_exit_stage(k, state)
            outputs.append(logits)
        return outputs


def loader(split: str, samples: int, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    dataset = SyntheticShapes(split, num_samples=samples, seed=seed, transform=transforms.ToTensor())
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=16, help="stem channels")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--val-samples", type=int, default=1024)
    parser.add_argument("--test-samples", type=int, default=1024)
    parser.add_argument("--p", type=float, default=1.0,
                        help="budget parameter of the official threshold search (exit fractions ~ p^k)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)

    torch.manual_seed(options.seed)
    device = torch.device("cpu")
    model = TinyEarlyExitNet(width=options.width)
    # Fuses the stem's and the downsampling convs' conv -> BN -> ReLU and RANet's dense layers;
    # prints what it replaced and what it left alone (here: nothing).
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
    flops = exit_flops(model, (32, 32))
    calibration = calibrate_thresholds(val_logits, flops, p=options.p)
    images, labels = next(iter(test))
    result = early_exit(model, images, calibration.thresholds)
    with torch.no_grad():
        full_top1 = (model(images)[-1].argmax(1) == labels).float().mean().item() * 100
    top1 = (result.logits.argmax(1) == labels).float().mean().item() * 100
    summary = {
        "exit_counts": result.exit_counts,
        "early_exit_top1": top1,
        "last_exit_top1": full_top1,
        "flops_per_image": result.flops_per_image,
        "full_flops_per_image": flops[-1],
        "thresholds": calibration.thresholds.tolist(),
        "converted": model.ranet_fast_converted,
    }
    print(f"early exit at p = {options.p}: {len(labels)} test images left at the exits {result.exit_counts}, "
          f"top-1 {top1:.1f}% (last exit for everybody: {full_top1:.1f}%), "
          f"{result.flops_per_image / 1e6:.2f} of {flops[-1] / 1e6:.2f} MFLOPs per image")
    print("summary " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
