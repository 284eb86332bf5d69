"""RANet (Yang et al., CVPR 2020) with the official module tree and parameter names.

The attribute names, the order in which modules are created and the arithmetic of every channel
count follow the official RANet-pytorch code, so its checkpoints load with ``strict=True`` and give
the same logits, and a model built after ``torch.manual_seed(s)`` starts from the same weights as the
official one built after the same call.

Layout of a model with S scales (flow 0 has the lowest resolution):

* ``FirstLayer`` turns the image into one base feature map per scale.
* ``scale_flows[i]`` holds ``nBlocks + i * block_step`` blocks. In flow ``i > 0`` the first blocks
  are fusion blocks (:class:`_BlockUpNormal`), one per block of flow ``i - 1``, each fed by that
  block's per-layer outputs; the rest are dense blocks (:class:`_BlockNormal`).
* ``classifier[k]`` follows each dense block, so the exits come flow by flow.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import NUM_CLASSES, validate_args


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True``, the interpolation RANet uses everywhere."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ConvBasic(nn.Module):
    """Conv -> BN -> ReLU."""

    def __init__(self, nIn: int, nOut: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(nIn, nOut, kernel_size=kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(nOut),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    """Bottleneck unit: a 1x1 conv to ``min(nIn, bnWidth * nOut)`` channels, then a 3x3 conv.

    With ``bnAfter`` (what RANet uses) each conv is followed by BN and ReLU; otherwise BN and ReLU
    come before each conv (pre-activation). ``type`` is ``'normal'`` (stride 1) or ``'down'``
    (stride 2 in the 3x3 conv).
    """

    def __init__(self, nIn: int, nOut: int, type: str, bnAfter: bool, bnWidth: int):
        super().__init__()
        if type not in ("normal", "down"):
            raise ValueError(f"ConvBN type must be 'normal' or 'down', got {type!r}")
        stride = 2 if type == "down" else 1
        nInner = min(nIn, bnWidth * nOut)
        squeeze = nn.Conv2d(nIn, nInner, kernel_size=1, stride=1, padding=0, bias=False)
        spatial = nn.Conv2d(nInner, nOut, kernel_size=3, stride=stride, padding=1, bias=False)
        if bnAfter:
            layers = [squeeze, nn.BatchNorm2d(nInner), nn.ReLU(inplace=True),
                      spatial, nn.BatchNorm2d(nOut), nn.ReLU(inplace=True)]
        else:
            layers = [nn.BatchNorm2d(nIn), nn.ReLU(inplace=True), squeeze,
                      nn.BatchNorm2d(nInner), nn.ReLU(inplace=True), spatial]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNormal(nn.Module):
    """Dense layer: ``cat([x, ConvBN(x)])``."""

    def __init__(self, nIn: int, nOut: int, bottleneck: bool, bnWidth: int):
        super().__init__()
        self.conv_normal = ConvBN(nIn, nOut, "normal", bottleneck, bnWidth)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, list):  # the official layer also accepts a one-element list
            x = x[0]
        return torch.cat([x, self.conv_normal(x)], dim=1)


class ConvUpNormal(nn.Module):
    """Fusion layer: features of the current flow plus up-sampled features of the coarser flow.

    ``forward([x_low, x])`` computes ``res = conv_normal(x)`` (stride 2 when ``down_sample``) and
    returns ``cat([resize(x), resize(conv_up(x_low)), res])`` at ``res``'s size. Of the ``nOut`` new
    channels, ``floor(nOut * compress_factor)`` come from the coarser flow.
    """

    def __init__(self, nIn1: int, nIn2: int, nOut: int, bottleneck: bool, bnWidth1: int,
                 bnWidth2: int, compress_factor: float, down_sample: bool):
        super().__init__()
        n_up = math.floor(nOut * compress_factor)
        self.conv_up = ConvBN(nIn2, n_up, "normal", bottleneck, bnWidth2)
        self.conv_normal = ConvBN(nIn1, nOut - n_up, "down" if down_sample else "normal",
                                  bottleneck, bnWidth1)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        x_low, x_cur = x
        res = self.conv_normal(x_cur)
        size = tuple(res.shape[-2:])
        # Same size means an identity resize; concatenating x itself gives the same values.
        kept = x_cur if tuple(x_cur.shape[-2:]) == size else resize_bilinear(x_cur, size)
        return torch.cat([kept, resize_bilinear(self.conv_up(x_low), size), res], dim=1)


class _BlockNormal(nn.Module):
    """Dense block of ``num_layers`` :class:`ConvNormal` layers and an optional transition.

    ``forward(x)`` returns ``(y, outputs)`` where ``outputs = [x, after layer 1, ..., after layer
    L]`` is what the next flow's fusion block reuses and ``y`` is the last output, passed through
    the transition when there is one.
    """

    def __init__(self, num_layers: int, nIn: int, growth_rate: int, reduction_rate: float,
                 trans: bool, bnFactor: int):
        super().__init__()
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            ConvNormal(nIn + i * growth_rate, growth_rate, True, bnFactor) for i in range(num_layers))
        nOut = nIn + num_layers * growth_rate
        self.trans_flag = trans
        if trans:
            self.trans = ConvBasic(nOut, math.floor(reduction_rate * nOut), kernel=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = [x]
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        if self.trans_flag:
            x = self.trans(x)
        return x, outputs

    def _blockType(self) -> str:
        return "norm"


class _BlockUpNormal(nn.Module):
    """Fusion block: ``num_layers`` :class:`ConvUpNormal` layers fed by the coarser flow.

    ``forward(x, low_feat)`` takes the coarser flow's per-layer outputs ``low_feat`` (length at least
    ``num_layers + 1``): layer ``i`` fuses ``low_feat[i]``, and at the end ``conv_last`` of
    ``low_feat[num_layers]`` is up-sampled and concatenated, followed by the optional transition.
    Only the last layer may down-sample.
    """

    def __init__(self, num_layers: int, nIn: int, nIn_lowFtrs: list[int], growth_rate: int,
                 reduction_rate: float, trans: bool, down: bool, compress_factor: float,
                 bnFactor1: int, bnFactor2: int):
        super().__init__()
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            ConvUpNormal(nIn + i * growth_rate, nIn_lowFtrs[i], growth_rate, True, bnFactor1,
                         bnFactor2, compress_factor, down and i == num_layers - 1)
            for i in range(num_layers))
        nOut = nIn + num_layers * growth_rate
        n_from_low = math.floor(nOut * compress_factor)
        self.conv_last = ConvBasic(nIn_lowFtrs[num_layers], n_from_low, kernel=1, stride=1, padding=0)
        nOut += n_from_low
        self.trans_flag = trans
        if trans:
            self.trans = ConvBasic(nOut, math.floor(reduction_rate * nOut), kernel=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, low_feat: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = [x]
        for i, layer in enumerate(self.layers):
            x = layer([low_feat[i], x])
            outputs.append(x)
        low = resize_bilinear(self.conv_last(low_feat[self.num_layers]), tuple(x.shape[-2:]))
        x = torch.cat([x, low], dim=1)
        if self.trans_flag:
            x = self.trans(x)
        return x, outputs

    def _blockType(self) -> str:
        return "up"


def uses_imagenet_stem(args: argparse.Namespace) -> bool:
    """ImageNet gets the 7x7/2 conv + max-pool stem and wide classifiers; every 32x32 data set
    (CIFAR and the synthetic set) the 3x3 stem and 128-channel classifiers."""
    return args.data == "ImageNet"


class RAFirstLayer(nn.Module):
    """Base features for every scale, computed coarse-to-fine from the image and returned with the
    lowest resolution first. Consecutive scales with the same ``scale_list`` entry share a
    resolution (stride 1); otherwise the resolution halves (stride 2)."""

    def __init__(self, nIn: int, nOut: int, args: argparse.Namespace):
        super().__init__()
        widths = [nOut * g for g in reversed(args.grFactor)]  # finest scale first
        scales = list(reversed(args.scale_list))
        self.layers = nn.ModuleList()
        if uses_imagenet_stem(args):
            self.layers.append(nn.Sequential(
                nn.Conv2d(nIn, widths[0], 7, 2, 3),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1)))
        else:
            self.layers.append(ConvBasic(nIn, widths[0], kernel=3, stride=1, padding=1))
        for i in range(1, args.nScales):
            stride = 1 if scales[i] == scales[i - 1] else 2
            self.layers.append(ConvBasic(widths[i - 1], widths[i], kernel=3, stride=stride, padding=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features[::-1]


class ClassifierModule(nn.Module):
    """Exit head: a conv stack ``m`` reduced to a vector, then a linear layer."""

    def __init__(self, m: nn.Module, channel: int, num_classes: int):
        super().__init__()
        self.m = m
        self.linear = nn.Linear(channel, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.m(x).flatten(1))


@dataclass(frozen=True)
class BlockPlan:
    """Where a block sits and the channel arithmetic it is built from."""

    flow: int
    index: int  # position in the flow, 0-based
    fusion: bool  # _BlockUpNormal (True) or _BlockNormal (False)
    num_layers: int
    nIn: int
    growth: int
    trans: bool
    down: bool
    low_channels: tuple[int, ...]  # channels of the coarser flow's per-layer outputs (fusion only)
    outputs: tuple[int, ...]  # channels of [input, after each layer] as the next flow sees them
    nOut: int  # channels leaving the block (after the transition)


def _has_transition(block_number: int, blocks_in_flow: int, scale: int) -> bool:
    """A flow at scale s gets transitions after the blocks floor(j * n / s), j = 1..s-1."""
    return any(block_number == math.floor(j * blocks_in_flow / scale) for j in range(1, scale))


def plan_blocks(args: argparse.Namespace) -> list[list[BlockPlan]]:
    """Every block of every flow, with the official channel arithmetic.

    ``stepmode='lg'`` grows the number of layers by ``step`` with every dense block built so far
    across all flows (one shared counter, as in the official constructor), so block ``n`` of any
    flow has ``n * step`` layers; 'even' gives every block ``step`` layers.
    """
    blocks_per_flow = [args.nBlocks + args.block_step * i for i in range(args.nScales)]
    steps = [args.step]
    plans: list[list[BlockPlan]] = []
    for flow in range(args.nScales):
        nIn = args.nChannels * args.grFactor[flow]
        growth = args.growthRate * args.grFactor[flow]
        fusion_blocks = blocks_per_flow[flow - 1] if flow > 0 else 0
        # A fusion block down-samples when its 1-based number equals the block count of one of
        # the last (scale - 1) entries of [0, blocks of flow 0, ..., blocks of flow - 1].
        earlier_counts = [0] + blocks_per_flow[:flow]
        down_numbers = set(earlier_counts[-(args.scale_list[flow] - 1):]) if flow > 0 else set()
        flow_plans = []
        for index in range(blocks_per_flow[flow]):
            num_layers = steps[index]
            trans = _has_transition(index + 1, blocks_per_flow[flow], args.scale_list[flow])
            fusion = index < fusion_blocks
            outputs = tuple(nIn + i * growth for i in range(num_layers + 1))
            nOut = outputs[-1]
            if fusion:
                low_channels = plans[flow - 1][index].outputs
                nOut += math.floor(nOut * args.compress_factor)
            else:
                low_channels = ()
                steps.append(steps[-1] + args.step if args.stepmode == "lg" else args.step)
            if trans:
                nOut = math.floor(args.reduction * nOut)
            flow_plans.append(BlockPlan(flow, index, fusion, num_layers, nIn, growth, trans,
                                        fusion and index + 1 in down_numbers, low_channels, outputs, nOut))
            nIn = nOut
        plans.append(flow_plans)
    return plans


class RANet(nn.Module):
    """Resolution Adaptive Network built from the official argparse namespace.

    ``forward(x)`` returns the list of exit logits, coarsest flow first. Like the official
    constructor, this sets ``args.num_exits``.
    """

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        validate_args(args)
        self.nScales = len(args.scale_list)
        self.nBlocks = [0] + [args.nBlocks + args.block_step * i for i in range(self.nScales)]
        self.steps = args.step
        self.compress_factor = args.compress_factor
        self.bnFactor = list(args.bnFactor)
        num_classes = getattr(args, "num_classes", None) or NUM_CLASSES[args.data]
        imagenet = uses_imagenet_stem(args)

        # Registration order fixes the state_dict order: the official model registers the (still
        # empty) flows and exits before the first layer.
        self.scale_flows = nn.ModuleList()
        self.classifier = nn.ModuleList()
        self.FirstLayer = RAFirstLayer(3, args.nChannels, args)
        # Modules are created in the official order (blocks and exits interleaved, flow by flow)
        # so that the same seed gives the same initial weights.
        for flow, flow_plans in enumerate(plan_blocks(args)):
            blocks = nn.ModuleList()
            for plan in flow_plans:
                blocks.append(self._build_block(plan, args))
                if not plan.fusion:
                    self.classifier.append(self._build_classifier(plan.nOut, num_classes, imagenet))
            self.scale_flows.append(blocks)
        args.num_exits = len(self.classifier)

        for module in (*self.scale_flows.modules(), *self.classifier.modules()):
            _init_weights(module)

    def _build_block(self, plan: BlockPlan, args: argparse.Namespace) -> nn.Module:
        if plan.fusion:
            return _BlockUpNormal(plan.num_layers, plan.nIn, list(plan.low_channels), plan.growth,
                                  args.reduction, plan.trans, plan.down, args.compress_factor,
                                  bnFactor1=self.bnFactor[plan.flow], bnFactor2=self.bnFactor[plan.flow - 1])
        return _BlockNormal(plan.num_layers, plan.nIn, plan.growth, args.reduction, plan.trans,
                            bnFactor=self.bnFactor[plan.flow])

    @staticmethod
    def _build_classifier(nIn: int, num_classes: int, imagenet: bool) -> ClassifierModule:
        width = nIn if imagenet else 128
        conv = nn.Sequential(
            ConvBasic(nIn, width, kernel=3, stride=2, padding=1),
            ConvBasic(width, width, kernel=3, stride=2, padding=1),
            nn.AvgPool2d(2),
        )
        return ClassifierModule(conv, width, num_classes)

    # Staged execution: the interface of ranet_fast.inference.early_exit. ``forward`` is built on
    # it too, so the staged path is the model's own computation, not a copy of it.

    @property
    def num_exits(self) -> int:
        return len(self.classifier)

    @functools.cached_property
    def _stage_plan(self) -> tuple[list[tuple[int, int]], list[int]]:
        """(flow, block index) of every block in execution order, and the position in that order of
        each exit's (dense) block. Fixed by the constructor, so computed once, not on every stage."""
        schedule = [(flow, index) for flow in range(self.nScales) for index in range(len(self.scale_flows[flow]))]
        exit_blocks = [position for position, (flow, index) in enumerate(schedule)
                       if self.scale_flows[flow][index]._blockType() == "norm"]
        return schedule, exit_blocks

    def early_exit_start(self, x: torch.Tensor) -> dict:
        """The state before the first block: the base features of every scale.

        The state is a dict of (lists of) tensors whose dim 0 is the batch; its structure is fixed
        by the exit it precedes, so an engine may compact every tensor in it with one index.
        """
        base = self.FirstLayer(x)
        return {"h": base[0], "base": base[1:], "low": {}, "features": []}

    def early_exit_stage(self, exit_index: int, state: dict) -> tuple[torch.Tensor, dict]:
        """Run the blocks from after exit ``exit_index - 1`` through exit ``exit_index``'s block and
        classifier; return that exit's logits and the state the next stage needs.

        The returned state holds only what later blocks read: the current features ``h``, the
        current flow's per-block outputs (the next flow's fusion blocks reuse them; dropped in the
        last flow), the coarser flow's outputs not yet fused (``low``, keyed by block index) and
        the base features of the flows still to come.
        """
        if not 0 <= exit_index < self.num_exits:
            raise IndexError(f"RANet has {self.num_exits} exits; exit_index {exit_index} is out of range")
        schedule, exit_blocks = self._stage_plan
        first = exit_blocks[exit_index - 1] + 1 if exit_index > 0 else 0
        h, base, low, features = state["h"], list(state["base"]), dict(state["low"]), list(state["features"])
        for flow, index in schedule[first:exit_blocks[exit_index] + 1]:
            if index == 0 and flow > 0:  # a new, finer flow starts from its base features
                low = dict(enumerate(features))
                features = []
                h = base.pop(0)
            block = self.scale_flows[flow][index]
            if block._blockType() == "up":
                h, outputs = block(h, low.pop(index))
            else:
                h, outputs = block(h)
            features.append(outputs)
        flow = schedule[exit_blocks[exit_index]][0]
        logits = self.classifier[exit_index](h)
        last_flow = flow == self.nScales - 1
        return logits, {"h": h, "base": base, "low": low, "features": [] if last_flow else features}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state = self.early_exit_start(x)
        logits = []
        for exit_index in range(self.num_exits):
            exit_logits, state = self.early_exit_stage(exit_index, state)
            logits.append(exit_logits)
        return logits


def _init_weights(m: nn.Module) -> None:
    """The official initialisation of blocks and exits (the first layer keeps PyTorch's)."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
    elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
    elif isinstance(m, nn.Linear):
        m.bias.data.zero_()
