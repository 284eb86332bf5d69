"""MSDNet configurations: the official README's settings, post-processing, validation and the
layer plan that the constructor and the validation share.

Every configuration is an ``argparse.Namespace`` with the fields of kalviny/MSDNet-PyTorch's
``args.py`` after its ``main.py`` post-processing (``grFactor``/``bnFactor`` parsed into lists of
int, ``nScales`` and ``num_classes`` filled in), so the same object drives ``MSDNet(args)``
whether it came from the trainer's command line, from ``msdnet_config`` or from the official
scripts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from .configs import DATA_SETS, IMAGE_SIZES, NUM_CLASSES, parse_factor_list

# Defaults of the official args.py for the MSDNet flags. ``stepmode`` has no default there:
# None, which the official constructor treats like 'lin_grow' (anything but 'even' grows).
MSDNET_DEFAULTS: dict[str, Any] = dict(
    arch="MSDNet", nBlocks=1, nChannels=32, base=4, stepmode=None, step=1, growthRate=6,
    grFactor="1-2-4", bnFactor="1-2-4", prune="max", bottleneck=True, reduction=0.5,
)

# The official README's three commands, as flags (other flags keep the official defaults).
# The CIFAR ones are run on CIFAR-100 there; ``data='cifar10'`` switches.
MSDNET_CONFIGS: dict[str, dict[str, Any]] = {
    # "Train an MSDNet (block=7) on CIFAR-100 for anytime prediction"
    "cifar": dict(data="cifar100", nBlocks=7, stepmode="even", step=2, base=4, nChannels=16),
    # "Train an MSDNet (block=5) on CIFAR-100 for efficient batch computation"
    "cifar-batch": dict(data="cifar100", nBlocks=5, stepmode="lin_grow", step=1, base=1, nChannels=16),
    # "Train an MSDNet (block=5, step=4) on ImageNet" (also the pre-trained models' settings)
    "imagenet": dict(data="ImageNet", nBlocks=5, stepmode="even", step=4, base=4, nChannels=32,
                     growthRate=16, grFactor="1-2-4-4", bnFactor="1-2-4-4"),
}


def finish_msdnet_args(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the official main.py post-processing in place and return ``args``: factor lists as
    int, ``nScales = len(grFactor)``, ``num_classes`` from the data set unless given."""
    for name in ("grFactor", "bnFactor"):
        setattr(args, name, parse_factor_list(getattr(args, name)))
    args.nScales = len(args.grFactor)
    if getattr(args, "num_classes", None) is None:
        if args.data not in NUM_CLASSES:
            raise ValueError(f"--data {args.data!r} is not one of {', '.join(DATA_SETS)}")
        args.num_classes = NUM_CLASSES[args.data]
    return args


def msdnet_config(name: str, **overrides: Any) -> argparse.Namespace:
    """The official argparse namespace of a README configuration.

    ``name`` is ``cifar`` (anytime prediction, 7 blocks), ``cifar-batch`` (budgeted batch
    classification, 5 blocks growing linearly) or ``imagenet`` (5 blocks of 4 layers). Keyword
    overrides replace any field, e.g. ``data='cifar10'`` or ``prune='min'``.
    """
    if name not in MSDNET_CONFIGS:
        raise ValueError(f"unknown MSDNet configuration {name!r}; choose from {', '.join(MSDNET_CONFIGS)}")
    fields = {**MSDNET_DEFAULTS, **MSDNET_CONFIGS[name], "num_classes": None, **overrides}
    args = finish_msdnet_args(argparse.Namespace(**fields))
    validate_msdnet_args(args)
    return args


def block_steps(args: argparse.Namespace) -> list[int]:
    """Layers per block: ``base`` for the first; then ``step`` ('even') or ``step * i + 1`` for
    block i (any other stepmode, None included, as in the official constructor)."""
    return [args.base] + [args.step if args.stepmode == "even" else args.step * i + 1
                          for i in range(1, args.nBlocks)]


@dataclass(frozen=True)
class LayerPlan:
    """One MSDNLayer (``transition`` False) or one transition ParallelModule (True).

    ``nIn`` is the base channel count entering it (scale s holds ``nIn * grFactor[s]``), ``nOut``
    the base count leaving it. A layer reads ``in_scales`` scales and writes ``out_scales``, the
    coarsest ones: the finest ``nScales - out_scales`` are pruned (dropped) for good.
    """

    transition: bool
    nIn: int
    nOut: int
    in_scales: int
    out_scales: int


def plan_msdnet(args: argparse.Namespace) -> list[list[LayerPlan]]:
    """Every block's layers and transitions with the official scale pruning and channel arithmetic.

    ``prune='max'`` splits all layers into ``nScales`` equal runs (``ceil(L / nScales)`` layers) and
    drops the finest scale at each run's start, with a transition right after that layer;
    ``prune='min'`` keeps every scale until only as many layers remain as there are scales, with
    transitions after layers ``floor(L / 3)`` and ``floor(2L / 3)``. ``reduction == 0`` means no
    transitions. ``floor(reduction * n)`` channels leave a transition.
    """
    steps = block_steps(args)
    total = sum(steps)
    scales = args.nScales
    nIn, done = args.nChannels, 0
    blocks = []
    for step in steps:
        layers = []
        for _ in range(step):
            done += 1
            if args.prune == "min":
                in_scales = min(scales, total - done + 2)
                out_scales = min(scales, total - done + 1)
                transition = done in (math.floor(total / 3), math.floor(2 * total / 3))
            else:
                interval = math.ceil(total / scales)
                in_scales = scales - max(0, done - 2) // interval
                out_scales = scales - (done - 1) // interval
                transition = in_scales > out_scales
            layers.append(LayerPlan(False, nIn, nIn + args.growthRate, in_scales, out_scales))
            nIn += args.growthRate
            if transition and args.reduction > 0:
                nOut = math.floor(args.reduction * nIn)
                layers.append(LayerPlan(True, nIn, nOut, out_scales, out_scales))
                nIn = nOut
        blocks.append(layers)
    return blocks


def validate_msdnet_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flags when an MSDNet configuration cannot build or run.

    The official code fails late (an index error in the constructor or a shape mismatch in the
    first forward) or, for some flags, silently builds something else; these checks state the
    rule that was broken instead.
    """
    unparsed = [f"--{name} {getattr(args, name)!r}" for name in ("grFactor", "bnFactor")
                if isinstance(getattr(args, name), str)]
    if unparsed:
        raise ValueError(f"invalid MSDNet configuration: {' and '.join(unparsed)} not parsed into a list of "
                         "int; apply finish_msdnet_args (the official main.py post-processing) first")
    problems = []
    data = getattr(args, "data", None)
    if data not in NUM_CLASSES:
        problems.append(f"--data {data!r} is not one of {', '.join(DATA_SETS)}")
    if len(args.grFactor) != len(args.bnFactor) or not args.grFactor:
        problems.append("--grFactor and --bnFactor must have the same, non-zero number of entries "
                        f"(one per scale), got --grFactor {args.grFactor}, --bnFactor {args.bnFactor}")
    for flag, value in (("--grFactor", args.grFactor), ("--bnFactor", args.bnFactor)):
        if any(not isinstance(v, int) or v < 1 for v in value):
            problems.append(f"{flag} entries must be positive integers, got {value}")
    if getattr(args, "nScales", len(args.grFactor)) != len(args.grFactor):
        problems.append(f"nScales={args.nScales} does not match --grFactor {args.grFactor}")
    for flag, attr in (("--nBlocks", "nBlocks"), ("--base", "base"), ("--step", "step"),
                       ("--nChannels", "nChannels"), ("--growthRate", "growthRate")):
        value = getattr(args, attr)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{flag} must be an integer >= 1, got {value!r}")
    if args.stepmode not in ("even", "lin_grow", None):
        problems.append(f"--stepmode must be 'even' or 'lin_grow', got {args.stepmode!r}")
    if args.prune not in ("min", "max"):
        problems.append(f"--prune must be 'min' or 'max', got {args.prune!r}")
    # The official ConvBN tests 'bottleneck is True': any other truthy value silently drops the
    # bottleneck convolutions, so only a real bool is accepted.
    if not isinstance(args.bottleneck, bool):
        problems.append(f"--bottleneck must be True or False, got {args.bottleneck!r}")
    if not 0.0 <= args.reduction <= 1.0:
        problems.append(f"--reduction must be in [0, 1] (0: no transition layers), got {args.reduction}")
    if problems:
        raise ValueError("invalid MSDNet configuration: " + "; ".join(problems))

    # Scales with a down-sampling input split their new channels evenly between a strided and a
    # plain ConvBN (nOut // 2 each): an odd count loses a channel and the next layer's shapes break.
    down_scales = set()
    plan = plan_msdnet(args)
    for layer in (layer for block in plan for layer in block if not layer.transition):
        first = args.nScales - layer.out_scales
        down_scales.update(range(first if layer.in_scales > layer.out_scales else first + 1, args.nScales))
    for scale in sorted(down_scales):
        growth = args.growthRate * args.grFactor[scale]
        if growth % 2:
            problems.append(f"scale {scale} grows by --growthRate x --grFactor[{scale}] = {growth} channels "
                            "per layer, which must be even (half from the finer scale, half from its own)")
    for layer in (layer for block in plan for layer in block if layer.transition):
        if layer.nOut < 1:
            problems.append(f"--reduction {args.reduction} leaves no channels after a transition "
                            f"of {layer.nIn} base channels")
            break
    lowest = _lowest_resolution(data, args.nScales)
    after_exit_convs = (((lowest - 1) // 2 + 1) - 1) // 2 + 1
    if after_exit_convs // 2 != 1:
        image = IMAGE_SIZES[data]
        problems.append(f"the exits reduce their input with two stride-2 convs and a 2x2 average pool to "
                        f"1x1, but with {args.nScales} scales (--grFactor {'-'.join(map(str, args.grFactor))}) "
                        f"a {image}x{image} {data} image reaches them at {lowest}x{lowest}")
    if problems:
        raise ValueError("invalid MSDNet configuration: " + "; ".join(problems))


def _lowest_resolution(data: str, scales: int) -> int:
    """Side of the coarsest scale: the stem (3x3 conv, or 7x7/2 conv and 3x3/2 max-pool on
    ImageNet), then one stride-2 3x3 conv per further scale."""
    side = IMAGE_SIZES[data]
    if data == "ImageNet":
        side = ((side - 1) // 2 + 1 - 1) // 2 + 1
    for _ in range(scales - 1):
        side = (side - 1) // 2 + 1
    return side
