"""Frozen inference layers with each BatchNorm folded into its convolution's weight and bias.

For a conv -> BN -> ReLU whose BN uses running statistics, ``bn(conv(x, W)) = conv(x, W * s) + b``
with ``s = gamma / sqrt(var + eps)`` per output channel and ``b = beta - mean * s``. Computing
``W * s`` and ``b`` once turns the layer into one plain convolution with a bias followed by an
in-place ReLU: on a CPU, oneDNN's convolution and one ReLU pass, with no per-call BN arithmetic.

This is the CPU path of :func:`ranet_fast.inference.optimize`. Measured on the project's 2-core
x86 machine (RANet C-1, batch 64, fp32, one thread, medians of interleaved runs), relative to the
eager model: these layers with channels_last activations 1.4-1.5x, the same in NCHW 1.1-1.2x, the
fused_conv2d layers of :func:`ranet_fast.convert` 0.75x (their CPU kernel runs a separate
epilogue pass over every conv output, and its 1x1 GEMM on NCHW copies its input). Replacing the
dense blocks' ``torch.cat`` with one shared buffer and the 1x1 convs with GEMMs on the buffer's
channel prefix, or the fusion layers' resize + concatenation with ``upsample_concat``, measured no
better (within the noise, or slower) with channels_last, so the dense and fusion layers and blocks
stay the official ones and only the convolutions change.

The folded tensors are a snapshot: :func:`fold` computes them once and nothing refreshes them
when weights or statistics change afterwards, which is why only ``optimize`` uses these layers, on
its own frozen copy of a model. Like the other fast layers they subclass the official modules and
change only ``forward`` (parameters and state_dict keys stay), and they run the official forward
in train mode and under :func:`ranet_fast.nn.dense.official_forward` (so ``count_flops`` sees
every submodule).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ranet_fast.models.ranet import ConvBasic, ConvBN

from .convert import FAST_CLASSES
from .dense import official_forward_active


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv followed by the eval-mode BN, in the conv weight's dtype and
    memory format. Computed in float64, so that folding adds no rounding beyond the final cast."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return weight.to(conv.weight.dtype).contiguous(memory_format=memory_format), shift.to(conv.weight.dtype)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    # Without running statistics BN normalises by batch statistics even in eval mode.
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and bn.running_var is not None)


class _FoldedConv:
    """One folded conv -> BN -> ReLU."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        with torch.no_grad():
            self.weight, self.bias = _folded_conv(conv, bn)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups).relu_()


def _use_folded(module: nn.Module) -> bool:
    return not module.training and not official_forward_active()


class FoldedConvBasic(ConvBasic):
    """``ConvBasic`` as one conv with the BN folded into weight and bias, then ReLU (eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_folded(self):
            return super().forward(x)
        return self._ranet_fast_folded(x)


class FoldedConvBN(ConvBN):
    """``ConvBN`` with ``bnAfter`` (conv -> BN -> ReLU, twice) as two folded convs (eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_folded(self):
            return super().forward(x)
        squeeze, spatial = self._ranet_fast_folded
        return spatial(squeeze(x))


def fold(model: nn.Module) -> dict[str, int]:
    """Swap the folded layers in, in place; return how many modules became each class.

    Every ``ConvBasic`` and every ``ConvBN`` with ``bnAfter`` (exact classes, or their fast
    subclasses from :func:`ranet_fast.convert`) whose BNs have running statistics becomes folded;
    every other fast layer of ``convert`` goes back to its official class, whose forward calls its
    (folded) submodules, where the fast one would call fused ops on the unfolded weights. Call it
    on a model already in its final device, dtype and memory format: the folded tensors are
    computed here, once, from the current weights and statistics.
    """
    official = {fast: base for base, fast in FAST_CLASSES.items()}
    counts: dict[str, int] = {}
    for module in model.modules():
        kind = official.get(type(module), type(module))
        new_class = kind if kind is not type(module) else None
        net = getattr(module, "net", None)
        if kind is ConvBasic and _foldable(net[0], net[1]):
            module._ranet_fast_folded = _FoldedConv(net[0], net[1])
            new_class = FoldedConvBasic
        elif kind is ConvBN and _foldable(net[0], net[1]) and _foldable(net[3], net[4]):
            module._ranet_fast_folded = (_FoldedConv(net[0], net[1]), _FoldedConv(net[3], net[4]))
            new_class = FoldedConvBN
        if new_class is not None:
            module.__class__ = new_class
            counts[new_class.__name__] = counts.get(new_class.__name__, 0) + 1
    return counts
