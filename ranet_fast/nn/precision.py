"""Which dtype a fast layer's convolutions compute in, and their weights cast and laid out once.

Under ``torch.autocast`` eager PyTorch runs a convolution on both operands cast to the autocast
dtype (bfloat16 or float16) and returns that dtype, while BatchNorm computes its statistics in
float32 from the low-precision input, keeps its running buffers in float32 and returns the input's
dtype. The fast layers follow the same policy: they cast the conv input and weight to
:func:`conv_dtype`, give the ops float32 BN vectors (the ops keep scales, shifts and statistics in
their float32 accumulation type) and run the ops with autocast switched off
(:func:`autocast_off`), so nothing inside them is cast a second time.

Eager autocast casts each weight again on every forward outside one autocast region. Here
:func:`conv_weight` keeps the weight in the dtype and the layout the kernels read (contiguous
[Co, Ci, k, k]: every backend's kernel would otherwise copy a channels_last weight on each call)
and makes it again only when the weight changed (its version counter, as optimizers and
``load_state_dict`` bump it), was replaced, or another dtype is asked for. In training the
optimizer changes every weight once per step, so a weight is cast at most once per step; in
inference once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

# Floating dtypes eager autocast casts to its own dtype (float64 it leaves alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_WEIGHT_CACHE_ATTRIBUTE = "_ranet_fast_compute_weight"


def autocast_active(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def outside_autocast_dtype(x: torch.Tensor) -> bool:
    """Whether autocast is on and x is not in its dtype: a layer that concatenates x with conv
    outputs (which are in the autocast dtype) then runs eagerly, whose ``cat`` promotes."""
    return autocast_active(x) and x.dtype != torch.get_autocast_dtype(x.device.type)


def conv_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype eager runs ``conv2d(x, weight)`` in here, or None where it would not run it in one
    dtype (mixed dtypes outside autocast, float64 under it): the fast layer then runs eagerly."""
    if autocast_active(x):
        if x.dtype in _AUTOCAST_ELIGIBLE and weight.dtype in _AUTOCAST_ELIGIBLE:
            return torch.get_autocast_dtype(x.device.type)
        return None
    return x.dtype if x.dtype == weight.dtype else None


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Switches autocast off for x's device while the ops run on already cast operands."""
    if autocast_active(x):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def conv_weight(conv: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
    """``conv.weight`` in ``dtype`` and contiguous (the layout the fused_conv2d kernels read).

    The weight itself when it already is; otherwise a cached copy, made again when the weight is
    replaced or modified in place, or in inference mode after one made outside it (and the other
    way round: inference tensors cannot enter autograd). Where the copy must carry gradients back
    to the weight (grad mode on and the weight requiring grad) and under torch.compile, which traces
    the cast into its graph, it is the differentiable cast, not cached. Writes through
    ``weight.data`` bypass the version counter and are not seen.
    """
    weight = conv.weight
    if weight.dtype == dtype and weight.is_contiguous():
        return weight
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and weight.requires_grad):
        return weight.to(dtype=dtype, memory_format=torch.contiguous_format)
    stamp = (weight._version, weight.data_ptr(), weight.device, torch.is_inference_mode_enabled())
    cache = conv.__dict__.setdefault(_WEIGHT_CACHE_ATTRIBUTE, {})
    entry = cache.get(dtype)
    if entry is not None and entry[0] is weight and entry[1] == stamp:
        return entry[2]
    with torch.no_grad():
        cast = weight.to(dtype=dtype, memory_format=torch.contiguous_format)
    cache[dtype] = (weight, stamp, cast)
    return cast
