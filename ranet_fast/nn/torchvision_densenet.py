"""torchvision's DenseNet layers on fused_conv2d, with a concat-free dense block in eval mode.

torchvision's ``_DenseLayer`` computes ``conv2(relu2(norm2(conv1(relu1(norm1(cat(inputs)))))))`` (then
dropout, the identity in eval mode) and its ``_DenseBlock`` concatenates the block input with every
layer's new channels, each layer reading the concatenation of all before it. With the BNs in eval
mode the layer is two fused_conv2d calls (norm1 + relu1 as the first conv's prologue, norm2 +
relu2 as its epilogue; the second conv plain), and the block allocates its [N, C_in + L * growth,
H, W] output once: the input is copied in and each layer reads the channel prefix in place and
writes its growth channels after it, the pattern of :class:`ranet_fast.nn.FastBlockNormal`.

Only layers whose children are exactly ``norm1, relu1, conv1, norm2, relu2, conv2`` of the torch.nn
classes, with size-preserving convs fused_conv2d computes, are converted (see
:func:`dense_layer_unsupported_reason`). Whenever a call is not provably the same computation
(train-mode BN, dropout active, hooks on a child or layer, autocast, a dtype the op lacks,
:func:`~ranet_fast.nn.common.official_forward`) the original forward runs; with gradients the block
runs the original forward over the (fused, differentiable) layers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torchvision.models.densenet import _DenseBlock, _DenseLayer

from .common import buffer_like, official_forward_active, requires_grad, run_faster_path
from .generic import Segment, conv_unsupported_reason, has_hooks, run_segment, segment_fusable

_CHILDREN = {"norm1": nn.BatchNorm2d, "relu1": nn.ReLU, "conv1": nn.Conv2d, "norm2": nn.BatchNorm2d,
             "relu2": nn.ReLU, "conv2": nn.Conv2d}
# norm1 -> relu1 -> conv1 -> norm2 -> relu2 as one call, then conv2.
_BOTTLENECK = Segment(conv="conv1", pre_bn="norm1", post_bn="norm2", activation="relu",
                      steps=("norm1", "relu1", "conv1", "norm2", "relu2"))
_SPATIAL = Segment(conv="conv2", pre_bn=None, post_bn=None, activation="none", steps=("conv2",))


def dense_layer_unsupported_reason(layer: _DenseLayer) -> str | None:
    modules = layer._modules
    if list(modules) != list(_CHILDREN) or any(type(modules[k]) is not v for k, v in _CHILDREN.items()):
        return "children are not exactly norm1, relu1, conv1, norm2, relu2, conv2 (BatchNorm2d, ReLU, Conv2d)"
    for name in ("conv1", "conv2"):
        conv = modules[name]
        reason = conv_unsupported_reason(conv)
        if reason is None and (conv.stride != (1, 1) or conv.padding[0] != (conv.kernel_size[0] - 1) // 2):
            reason = "does not keep the spatial size (stride 1, padding (k - 1) // 2)"
        if reason is not None:
            return f"{name}: {reason}"
    norm1, conv1, norm2, conv2 = modules["norm1"], modules["conv1"], modules["norm2"], modules["conv2"]
    if not (norm1.num_features == conv1.in_channels and norm2.num_features == conv1.out_channels == conv2.in_channels):
        return "channel counts of norm1/conv1/norm2/conv2 do not chain"
    return None


def dense_block_unsupported_reason(block: _DenseBlock) -> str | None:
    layers = list(block.values())
    if not layers:
        return "no layers"
    channels = None
    for name, layer in block.items():
        if type(layer) is not _DenseLayer and type(layer) is not FastDenseLayer:
            return f"{name} is a {type(layer).__name__}, not torchvision's _DenseLayer"
        reason = dense_layer_unsupported_reason(layer)
        if reason is not None:
            return f"{name}: {reason}"
        if channels is not None and layer.norm1.num_features != channels:
            return f"{name} reads {layer.norm1.num_features} channels, the block has {channels} by then"
        channels = layer.norm1.num_features + layer.conv2.out_channels
    return None


class FastDenseLayer(_DenseLayer):
    """torchvision ``_DenseLayer`` as two fused_conv2d calls in eval mode (else the original forward)."""

    def fusable(self, x: torch.Tensor) -> bool:
        return (
            not official_forward_active()
            and not torch.is_autocast_enabled(x.device.type)
            and not (self.training and self.drop_rate > 0)  # dropout draws random numbers in train mode
            and segment_fusable(self, _BOTTLENECK, x)
            and segment_fusable(self, _SPATIAL, x)
        )

    def forward(self, input):
        features = [input] if isinstance(input, torch.Tensor) else input
        if not features or not self.fusable(features[0]):
            return super().forward(input)
        return run_faster_path(self, tuple(features), functools.partial(self._fused, features),
                               functools.partial(super().forward, input))

    def _fused(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[0] if len(features) == 1 else torch.cat(features, 1)
        return run_segment(self, _SPATIAL, run_segment(self, _BOTTLENECK, x))

    def forward_into(self, prefix: torch.Tensor, out: torch.Tensor, offset: int) -> None:
        """Writes the new channels for the block prefix ``prefix`` into ``out[:, offset:]``; the caller
        checked :meth:`fusable`; not differentiable."""
        run_segment(self, _SPATIAL, run_segment(self, _BOTTLENECK, prefix), out, offset)


class FastDenseBlock(_DenseBlock):
    """torchvision ``_DenseBlock`` writing every layer's channels into one buffer in eval mode."""

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        layers = list(self.values())
        x = init_features
        if (not isinstance(x, torch.Tensor) or x.dim() != 4 or requires_grad(x, self)
                or x.shape[1] != layers[0].norm1.num_features
                or not all(type(layer) is FastDenseLayer and not has_hooks(layer) and layer.fusable(x)
                           for layer in layers)):
            return super().forward(init_features)
        return run_faster_path(self, (x,), functools.partial(self._in_buffer, x, layers),
                               functools.partial(super().forward, init_features))

    def _in_buffer(self, x: torch.Tensor, layers: list[FastDenseLayer]) -> torch.Tensor:
        channels = x.shape[1]
        out = buffer_like(x, channels + sum(layer.conv2.out_channels for layer in layers))
        out[:, :channels].copy_(x)
        for layer in layers:
            layer.forward_into(out[:, :channels], out, channels)
            channels += layer.conv2.out_channels
        return out


FAST_CLASSES = {_DenseLayer: FastDenseLayer, _DenseBlock: FastDenseBlock}
UNSUPPORTED_REASON = {_DenseLayer: dense_layer_unsupported_reason, _DenseBlock: dense_block_unsupported_reason}
OWNED_CHILDREN = {FastDenseLayer: tuple(_CHILDREN)}  # all six run inside its two fused calls
