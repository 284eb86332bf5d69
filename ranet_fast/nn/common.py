"""What the eval-mode and the train-mode fast layers share: when a conv can be fused, the switch to
the official forward, and the buffers dense blocks and fusion layers write into."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ranet_fast.ops.fused_conv2d import SUPPORTED_DTYPES, SUPPORTED_STRIDES

from .precision import conv_dtype

_official_forward = False


@contextlib.contextmanager
def official_forward():
    """Within this context every fast layer runs its official module's forward, which calls the
    layer's submodules (Conv2d, BatchNorm2d, ReLU), so hooks on them fire: ``count_flops`` counts a
    converted model through them."""
    global _official_forward
    previous, _official_forward = _official_forward, True
    try:
        yield
    finally:
        _official_forward = previous


def official_forward_active() -> bool:
    return _official_forward


def requires_grad(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def conv_supported(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether fused_conv2d computes exactly this conv for x, in the dtype eager would (under autocast
    too, see ``precision.conv_dtype``); else the layer runs eagerly."""
    kernel = conv.kernel_size[0]
    return (
        conv.kernel_size[1] == kernel
        and conv.stride[0] == conv.stride[1] in SUPPORTED_STRIDES
        and conv.padding[0] == conv.padding[1] in (0, (kernel - 1) // 2)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and x.dim() == 4
        and conv_dtype(x, conv.weight) in SUPPORTED_DTYPES
    )


def buffer_like(x: torch.Tensor, channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An uninitialised [N, channels, *size] tensor (size default: x's) in x's memory format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    size = tuple(x.shape[2:]) if size is None else size
    return torch.empty((x.shape[0], channels, *size), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)
