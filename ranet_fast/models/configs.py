"""RANet configurations: the paper's named models and validation of the official flags.

Every configuration is an ``argparse.Namespace`` with the fields of the official ``args.py`` after
its post-processing (factor lists parsed into ints, ``nScales`` and ``num_classes`` filled in), so
the same object drives ``RANet(args)`` whether it came from the trainer's command line or from
``ranet_config``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

# Classes per data set; 'synthetic' is the embedded procedural data set of ranet_fast.data
# (tests/test_synthetic.py checks its class count and image size against these tables).
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "ImageNet": 1000, "synthetic": 10}
DATA_SETS = tuple(NUM_CLASSES)
# Image side each data set is trained and evaluated at (the official IM_SIZE).
IMAGE_SIZES = {"cifar10": 32, "cifar100": 32, "ImageNet": 224, "synthetic": 32}

# Flags shared by every paper configuration (official args.py defaults).
_COMMON = dict(
    arch="RANet",
    nBlocks=2,
    block_step=2,
    compress_factor=0.25,
    reduction=0.5,
    bnAfter=True,
    stepmode="even",
)

# The paper's configurations written as the official command-line flags (ranet-notes.md).
PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    "cifar-c1": dict(data="cifar10", scale_list="1-2-3", grFactor="4-2-1", bnFactor="4-2-1",
                     step=4, nChannels=16, growthRate=6),
    "cifar-c2": dict(data="cifar10", scale_list="1-2-2-3", grFactor="4-2-2-1", bnFactor="4-2-2-1",
                     step=4, nChannels=16, growthRate=6),
    "cifar-c3": dict(data="cifar10", scale_list="1-2-3-3", grFactor="4-2-1-1", bnFactor="4-2-1-1",
                     step=4, nChannels=16, growthRate=6),
    "imagenet-1": dict(data="ImageNet", scale_list="1-2-3-4", grFactor="4-2-2-1",
                       bnFactor="4-2-2-1", step=8, nChannels=32, growthRate=16),
    "imagenet-2": dict(data="ImageNet", scale_list="1-2-3-4", grFactor="4-2-2-1",
                       bnFactor="4-2-2-1", step=8, nChannels=64, growthRate=16),
}


def parse_factor_list(value: str | list[int] | tuple[int, ...]) -> list[int]:
    """Parse an official dash-separated factor flag such as ``"4-2-1"`` into ``[4, 2, 1]``."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(part) for part in str(value).split("-")]
    except ValueError:
        raise ValueError(f"expected a dash-separated list of integers such as '4-2-1', got {value!r}") from None


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the official args.py post-processing in place and return ``args``.

    Factor flags become lists of int, ``nScales`` is the number of scales and ``num_classes``
    follows the data set unless it was given explicitly.
    """
    for name in ("grFactor", "bnFactor", "scale_list"):
        setattr(args, name, parse_factor_list(getattr(args, name)))
    args.nScales = len(args.grFactor)
    if getattr(args, "num_classes", None) is None:
        if args.data not in NUM_CLASSES:
            raise ValueError(f"--data {args.data!r} is not one of {', '.join(DATA_SETS)}")
        args.num_classes = NUM_CLASSES[args.data]
    return args


def ranet_config(name: str, **overrides: Any) -> argparse.Namespace:
    """The official argparse namespace of a paper configuration.

    ``name`` is one of ``cifar-c1``, ``cifar-c2``, ``cifar-c3``, ``imagenet-1``, ``imagenet-2``.
    Keyword overrides replace any field, e.g. ``data='cifar100'`` or ``num_classes=10`` (factor
    lists may be given as ``"4-2-1"`` or ``[4, 2, 1]``).
    """
    if name not in PAPER_CONFIGS:
        raise ValueError(f"unknown RANet configuration {name!r}; choose from {', '.join(PAPER_CONFIGS)}")
    # num_classes follows the data set unless overridden.
    fields = {**_COMMON, **PAPER_CONFIGS[name], "num_classes": None, **overrides}
    args = finish_args(argparse.Namespace(**fields))
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flags when an architecture configuration cannot build.

    The official code fails late (an index error deep in the constructor, or a shape mismatch in
    the first forward); these checks state the rule that was broken instead.
    """
    problems = []
    data = getattr(args, "data", None)
    if data not in NUM_CLASSES:
        problems.append(f"--data {data!r} is not one of {', '.join(DATA_SETS)}")
    lists = {flag: getattr(args, attr) for flag, attr in
             (("--scale-list", "scale_list"), ("--grFactor", "grFactor"), ("--bnFactor", "bnFactor"))}
    lengths = {flag: len(value) for flag, value in lists.items()}
    if len(set(lengths.values())) != 1:
        problems.append("--scale-list, --grFactor and --bnFactor must have the same number of entries "
                        "(one per scale), got " + ", ".join(f"{f} {v}" for f, v in lengths.items()))
    for flag, value in lists.items():
        if any(v < 1 for v in value):
            problems.append(f"{flag} entries must be positive integers, got {value}")
    if getattr(args, "nScales", len(args.grFactor)) != len(args.grFactor):
        problems.append(f"nScales={args.nScales} does not match --grFactor {args.grFactor}")
    scales = args.scale_list
    if scales and (scales[0] != 1 or any(b - a not in (0, 1) for a, b in zip(scales, scales[1:]))
                   or any(s < 2 for s in scales[1:])):
        # Entries after the first must be >= 2: the official block builder marks the last
        # (scale - 1) fusion blocks as down-sampling, and for scale 1 that slice is all of them.
        problems.append(f"--scale-list must be 1 followed by entries >= 2 that grow by 0 or 1, got {scales}")
    for flag, attr, low in (("--nBlocks", "nBlocks", 1), ("--step", "step", 1),
                            ("--nChannels", "nChannels", 1), ("--growthRate", "growthRate", 1),
                            ("--block-step", "block_step", 0)):
        value = getattr(args, attr)
        if not isinstance(value, int) or value < low:
            problems.append(f"{flag} must be an integer >= {low}, got {value!r}")
    if args.stepmode not in ("even", "lg"):
        problems.append(f"--stepmode must be 'even' or 'lg', got {args.stepmode!r}")
    if not 0.0 < args.compress_factor < 1.0:
        problems.append(f"--compress-factor must be in (0, 1), got {args.compress_factor}")
    if not 0.0 < args.reduction <= 1.0:
        problems.append(f"--reduction must be in (0, 1], got {args.reduction}")
    if problems:
        raise ValueError("invalid RANet configuration: " + "; ".join(problems))

    # A flow at scale s must halve its resolution s-1 times in its fusion blocks to reach the lowest
    # resolution that the classifiers expect; flow i has as many fusion blocks as flow i-1 has blocks.
    for flow, scale in enumerate(scales[1:], start=1):
        fusion_blocks = args.nBlocks + args.block_step * (flow - 1)
        if scale - 1 > fusion_blocks:
            problems.append(f"scale flow {flow} (--scale-list entry {scale}) needs {scale - 1} "
                            f"down-sampling blocks but has only {fusion_blocks} fusion blocks "
                            "(raise --nBlocks or --block-step)")
        if math.floor(args.growthRate * args.grFactor[flow] * args.compress_factor) < 1:
            problems.append(f"--compress-factor {args.compress_factor} gives the up-sampling branch of "
                            f"scale flow {flow} no channels (growth {args.growthRate * args.grFactor[flow]})")
    lowest = _lowest_resolution(args.data, scales)
    after_exit_convs = (((lowest - 1) // 2 + 1) - 1) // 2 + 1
    if after_exit_convs // 2 != 1:
        image = IMAGE_SIZES[args.data]
        problems.append(f"the exits reduce their input with two stride-2 convs and a 2x2 average pool "
                        f"to 1x1, but with --scale-list {'-'.join(map(str, scales))} a {image}x{image} "
                        f"{args.data} image reaches them at {lowest}x{lowest}")
    if problems:
        raise ValueError("invalid RANet configuration: " + "; ".join(problems))


def _lowest_resolution(data: str, scales: list[int]) -> int:
    """Side of the coarsest feature map for the data set's image size: the stem (3x3 conv, or
    7x7/2 conv and 3x3/2 max-pool on ImageNet), then one stride-2 3x3 conv per scale change."""
    side = IMAGE_SIZES[data]
    if data == "ImageNet":
        side = ((side - 1) // 2 + 1 - 1) // 2 + 1
    for _ in range(len(set(scales)) - 1):
        side = (side - 1) // 2 + 1
    return side
