"""MSDNet's concatenating units without torch.cat in eval mode.

MSDNet's ``ConvBN`` is an ``nn.Sequential`` of conv -> BN -> ReLU (once or twice), which
:func:`ranet_fast.convert` fuses like any such Sequential (:mod:`ranet_fast.nn.generic`). The units
around it concatenate: ``ConvNormal`` returns ``cat([x, conv_normal(x)])`` and ``ConvDownNormal``
``cat([x_s, conv_down(x_{s-1}), conv_normal(x_s)])``. In eval mode without gradients these allocate
their output once, copy the kept input in and let each branch's last fused conv write its channels
in place. Train mode, gradients and :func:`~ranet_fast.nn.common.official_forward` run the official
forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ranet_fast.models import msdnet
from ranet_fast.ops.fused_conv2d import output_size as conv_output_size

from .common import buffer_like, official_forward_active, requires_grad, run_faster_path
from .generic import FastSequentialMixin, has_hooks


def _last_conv(branch: msdnet.ConvBN) -> nn.Conv2d:
    return [m for m in branch.net if isinstance(m, nn.Conv2d)][-1]


def _branch_size(branch: msdnet.ConvBN, x: torch.Tensor) -> tuple[int, ...]:
    conv = _last_conv(branch)
    return tuple(conv_output_size(s, conv.kernel_size[0], conv.stride[0], conv.padding[0]) for s in x.shape[2:])


def _branch_into(branch: msdnet.ConvBN, x: torch.Tensor, out: torch.Tensor, offset: int) -> None:
    """Writes branch(x) into out[:, offset:]: straight from its fused Sequential when nothing would
    observe the difference (no hooks on the branch or its Sequential), else computed and copied."""
    net = branch.net
    if type(branch) is msdnet.ConvBN and isinstance(net, FastSequentialMixin) and not (has_hooks(branch)
                                                                                      or has_hooks(net)):
        net.forward_into(x, out, offset)
    else:
        result = branch(x)
        out.narrow(1, offset, result.shape[1]).copy_(result)


class FastMSDConvNormal(msdnet.ConvNormal):
    """MSDNet ``ConvNormal`` (``cat([x, conv_normal(x)])``) with one output allocation in eval mode."""

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, list):  # the official unit also accepts a one-element list
            x = x[0]
        if (self.training or official_forward_active() or requires_grad(x, self)
                or _branch_size(self.conv_normal, x) != tuple(x.shape[2:])):
            return super().forward(x)
        return run_faster_path(self, (x,), functools.partial(self._in_place, x), functools.partial(super().forward, x))

    def _in_place(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        out = buffer_like(x, channels + _last_conv(self.conv_normal).out_channels)
        out[:, :channels].copy_(x)
        _branch_into(self.conv_normal, x, out, channels)
        return out


class FastConvDownNormal(msdnet.ConvDownNormal):
    """MSDNet ``ConvDownNormal`` with one output allocation in eval mode: the current scale copied in,
    the strided branch (from the finer scale) and the plain branch writing their channels after it."""

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        finer, current = x
        size = tuple(current.shape[2:])
        if (self.training or official_forward_active() or requires_grad(finer, self) or current.requires_grad
                or _branch_size(self.conv_down, finer) != size or _branch_size(self.conv_normal, current) != size):
            return super().forward(x)
        return run_faster_path(self, (finer, current), functools.partial(self._in_place, finer, current),
                               functools.partial(super().forward, x))

    def _in_place(self, finer: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        channels, down = current.shape[1], _last_conv(self.conv_down).out_channels
        out = buffer_like(current, channels + down + _last_conv(self.conv_normal).out_channels)
        out[:, :channels].copy_(current)
        _branch_into(self.conv_down, finer, out, channels)
        _branch_into(self.conv_normal, current, out, channels + down)
        return out
