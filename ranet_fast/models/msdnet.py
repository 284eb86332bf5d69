"""MSDNet (Huang et al., ICLR 2018) with the module tree and parameter names of kalviny/MSDNet-PyTorch.

Class names, attribute names, the order in which modules are created and every channel count
follow the official ``models/msdnet.py``, so its checkpoints load with ``strict=True`` and give the
same logits, and a model built after ``torch.manual_seed(s)`` starts from the same weights as the
official one built after the same call.

Layout (scale 0 has the finest resolution; each further scale halves it):

* ``blocks[i]`` is an ``nn.Sequential``; ``blocks[0][0]`` is :class:`MSDNFirstLayer` (the image to
  one feature map per scale), then every block holds :class:`MSDNLayer` s, each followed, where the
  configuration says so, by a transition (:class:`ParallelModule` of 1x1 :class:`ConvBasic`).
  Features travel as a list, finest scale first; pruned layers drop the finest scales.
* ``classifier[i]`` (:class:`ClassifierModule`) reads the coarsest scale after ``blocks[i]``.

Official behaviours reproduced on purpose:

* The official ``_init_weights`` loop only visits each block's direct children (first layer, dense
  layers, transitions) and the classifier modules, none of which is a Conv2d, BatchNorm2d or
  Linear, so it changes nothing: every weight keeps PyTorch's default initialisation, drawn in
  module-creation order. This model does the same (no re-initialisation).
* ``stepmode`` other than 'even' (None, the official default, included) grows block i to
  ``step * i + 1`` layers.
* Data sets other than ImageNet (CIFAR, the synthetic set) get the 3x3 stem and 128-channel exits;
  the class count is ``args.num_classes`` when set, else the data set's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from . import ranet
from .configs import NUM_CLASSES
from .msdnet_configs import LayerPlan, block_steps, plan_msdnet, validate_msdnet_args
from .ranet import ConvBasic, uses_imagenet_stem

__all__ = ["ClassifierModule", "ConvBN", "ConvBasic", "ConvDownNormal", "ConvNormal", "MSDNFirstLayer",
           "MSDNLayer", "MSDNet", "ParallelModule"]


class ConvBN(nn.Module):
    """[1x1 conv to ``min(nIn, bnWidth * nOut)`` channels, BN, ReLU] when ``bottleneck``, then a 3x3
    conv (stride 2 for ``type='down'``), BN, ReLU. Unlike RANet's ConvBN the bottleneck is optional
    and BN always follows the conv."""

    def __init__(self, nIn: int, nOut: int, type: str, bottleneck: bool, bnWidth: int):
        super().__init__()
        if type not in ("normal", "down"):
            raise ValueError(f"ConvBN type must be 'normal' or 'down', got {type!r}")
        layers: list[nn.Module] = []
        nInner = nIn
        if bottleneck:
            nInner = min(nIn, bnWidth * nOut)
            layers += [nn.Conv2d(nIn, nInner, kernel_size=1, stride=1, padding=0, bias=False),
                       nn.BatchNorm2d(nInner), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(nInner, nOut, kernel_size=3, stride=2 if type == "down" else 1, padding=1, bias=False),
                   nn.BatchNorm2d(nOut), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDownNormal(nn.Module):
    """Scale-s unit fed by scales s-1 (finer) and s: ``cat([x_s, down(x_{s-1}), normal(x_s)])``,
    ``nOut // 2`` new channels from each branch."""

    def __init__(self, nIn1: int, nIn2: int, nOut: int, bottleneck: bool, bnWidth1: int, bnWidth2: int):
        super().__init__()
        self.conv_down = ConvBN(nIn1, nOut // 2, "down", bottleneck, bnWidth1)
        self.conv_normal = ConvBN(nIn2, nOut // 2, "normal", bottleneck, bnWidth2)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        finer, current = x
        return torch.cat([current, self.conv_down(finer), self.conv_normal(current)], dim=1)


class ConvNormal(nn.Module):
    """Unit of the finest scale present: ``cat([x, ConvBN(x)])`` (takes a tensor or a one-element
    list, as the official one)."""

    def __init__(self, nIn: int, nOut: int, bottleneck: bool, bnWidth: int):
        super().__init__()
        self.conv_normal = ConvBN(nIn, nOut, "normal", bottleneck, bnWidth)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, list):
            x = x[0]
        return torch.cat([x, self.conv_normal(x)], dim=1)


class MSDNFirstLayer(nn.Module):
    """The image to ``nScales`` feature maps, finest first: a stem at scale 0 (3x3 ConvBasic, or on
    ImageNet a 7x7/2 conv with bias, BN, ReLU and a 3x3/2 max-pool), then one stride-2 ConvBasic per
    further scale, each fed by the previous scale."""

    def __init__(self, nIn: int, nOut: int, args: argparse.Namespace):
        super().__init__()
        self.layers = nn.ModuleList()
        width = nOut * args.grFactor[0]
        if uses_imagenet_stem(args):
            self.layers.append(nn.Sequential(
                nn.Conv2d(nIn, width, 7, 2, 3),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1)))
        else:
            self.layers.append(ConvBasic(nIn, width, kernel=3, stride=1, padding=1))
        for scale in range(1, args.nScales):
            self.layers.append(ConvBasic(width, nOut * args.grFactor[scale], kernel=3, stride=2, padding=1))
            width = nOut * args.grFactor[scale]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MSDNLayer(nn.Module):
    """One dense layer across scales: ``nOut * grFactor[s]`` new channels at each output scale s.

    It reads ``inScales`` scales and writes the coarsest ``outScales``; ``offset = nScales -
    outScales`` is the finest scale written. When a scale is discarded (``inScales > outScales``)
    the finest written scale is also fed by the discarded one (a :class:`ConvDownNormal`);
    otherwise it has only itself (a :class:`ConvNormal`). Every coarser scale is a ConvDownNormal.
    """

    def __init__(self, nIn: int, nOut: int, args: argparse.Namespace, inScales: int | None = None,
                 outScales: int | None = None):
        super().__init__()
        self.nIn = nIn
        self.nOut = nOut
        self.inScales = args.nScales if inScales is None else inScales
        self.outScales = args.nScales if outScales is None else outScales
        self.nScales = args.nScales
        self.discard = self.inScales - self.outScales
        self.offset = self.nScales - self.outScales
        self.layers = nn.ModuleList()
        gr, bn, first = args.grFactor, args.bnFactor, self.offset
        if self.discard > 0:
            self.layers.append(ConvDownNormal(nIn * gr[first - 1], nIn * gr[first], nOut * gr[first],
                                              args.bottleneck, bn[first - 1], bn[first]))
        else:
            self.layers.append(ConvNormal(nIn * gr[first], nOut * gr[first], args.bottleneck, bn[first]))
        for scale in range(first + 1, self.nScales):
            self.layers.append(ConvDownNormal(nIn * gr[scale - 1], nIn * gr[scale], nOut * gr[scale],
                                              args.bottleneck, bn[scale - 1], bn[scale]))

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        # Inputs of output j: with a discarded scale, (x[j], x[j + 1]) for every j (x[0] is the
        # scale being dropped); otherwise x[0] alone, then (x[j - 1], x[j]).
        if self.discard > 0:
            inputs = [[x[j], x[j + 1]] for j in range(self.outScales)]
        else:
            inputs = [[x[0]]] + [[x[j - 1], x[j]] for j in range(1, self.outScales)]
        return [layer(pair) for layer, pair in zip(self.layers, inputs)]


class ParallelModule(nn.Module):
    """Module ``m[i]`` applied to ``x[i]`` (Lua Torch's ParallelTable); MSDNet's transitions."""

    def __init__(self, parallel_modules: list[nn.Module]):
        super().__init__()
        self.m = nn.ModuleList(parallel_modules)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.m[i](x[i]) for i in range(len(x))]


class ClassifierModule(ranet.ClassifierModule):
    """Exit head on the coarsest scale: ``linear(flatten(m(x[-1])))``."""

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x[-1])


class MSDNet(nn.Module):
    """Multi-Scale Dense Network built from the official argparse namespace (post-processed:
    ``grFactor``/``bnFactor`` lists of int and ``nScales``; see ``msdnet_config``).

    ``forward(x)`` returns the list of the ``nBlocks`` exits' logits, earliest first.
    """

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        validate_msdnet_args(args)
        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        self.nBlocks = args.nBlocks
        self.steps = block_steps(args)
        num_classes = getattr(args, "num_classes", None) or NUM_CLASSES[args.data]
        imagenet = uses_imagenet_stem(args)
        # Modules are created in the official order (first layer, then each block's layers and
        # transitions followed by its classifier) so that a seed gives the official initial weights.
        for index, layer_plans in enumerate(plan_msdnet(args)):
            layers: list[nn.Module] = [MSDNFirstLayer(3, args.nChannels, args)] if index == 0 else []
            layers += [self._build_layer(plan, args) for plan in layer_plans]
            self.blocks.append(nn.Sequential(*layers))
            width = layer_plans[-1].nOut * args.grFactor[-1]
            self.classifier.append(self._build_classifier(width, num_classes, imagenet))

    @staticmethod
    def _build_layer(plan: LayerPlan, args: argparse.Namespace) -> nn.Module:
        if not plan.transition:
            return MSDNLayer(plan.nIn, args.growthRate, args, plan.in_scales, plan.out_scales)
        offset = args.nScales - plan.out_scales
        return ParallelModule([ConvBasic(plan.nIn * args.grFactor[scale], plan.nOut * args.grFactor[scale],
                                         kernel=1, stride=1, padding=0)
                               for scale in range(offset, args.nScales)])

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
    # it, so the staged path is the model's own computation, not a copy of it.

    @property
    def num_exits(self) -> int:
        return len(self.classifier)

    def early_exit_start(self, x: torch.Tensor) -> dict:
        """The state before the first block's dense layers: the first layer's per-scale features.

        The state is ``{"features": [tensor per scale, finest first]}``, every tensor with the batch
        in dim 0, so an engine may compact it with one index.
        """
        return {"features": self.blocks[0][0](x)}

    def early_exit_stage(self, exit_index: int, state: dict) -> tuple[torch.Tensor, dict]:
        """Run block ``exit_index`` (after the first layer, for block 0) and its classifier; return
        the exit's logits and the state the next stage reads: the block's per-scale features, or
        nothing after the last exit."""
        if not 0 <= exit_index < self.num_exits:
            raise IndexError(f"MSDNet has {self.num_exits} exits; exit_index {exit_index} is out of range")
        features = list(state["features"])
        layers = list(self.blocks[exit_index].children())
        for layer in layers[1:] if exit_index == 0 else layers:
            features = layer(features)
        logits = self.classifier[exit_index](features)
        return logits, {"features": features if exit_index < self.num_exits - 1 else []}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        state = self.early_exit_start(x)
        logits = []
        for exit_index in range(self.num_exits):
            exit_logits, state = self.early_exit_stage(exit_index, state)
            logits.append(exit_logits)
        return logits
