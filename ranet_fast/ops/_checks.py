"""Checks shared by the ops' input validation: memory layout, ints, per-channel vectors, out= buffers.

Each raises TypeError or ValueError with a message that names the op and the argument.
"""

from __future__ import annotations

import torch


def may_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory (an expanded or overlapping view).

    Sorted by stride, each dimension must step past everything the smaller-stride dimensions
    span; every ordinary layout (contiguous, channels_last, transposes, slices with steps)
    passes, an ``expand`` (stride 0) does not. An op that writes such a tensor would write one
    location several times, in an unspecified order (a data race on a GPU).
    """
    if tensor.numel() <= 1:
        return False
    span = 0  # offset of the last element reachable through the dimensions visited so far
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def require_no_overlap(op_name: str, name: str, tensor: torch.Tensor) -> None:
    """Raises ValueError when ``tensor``, which ``op_name`` writes, may have elements that share memory."""
    if may_overlap(tensor):
        raise ValueError(
            f"{op_name}: {name} has elements that share memory (an expanded view?), shape {tuple(tensor.shape)} "
            f"strides {tensor.stride()}; it is written, so pass a tensor with distinct elements, e.g. {name}.clone()"
        )


def require_int(op_name: str, name: str, value: object) -> int:
    """``value`` if it is an int (not a bool), else TypeError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{op_name} expects {name} as an int, got {value!r}")
    return value


def require_channel_vector(op_name: str, name: str, vector: object, length: int, x: torch.Tensor,
                           what: str = "channel", optional: bool = False) -> None:
    """A 1-D floating tensor of ``length`` entries (one per ``what``) on x's device; None too if ``optional``."""
    if vector is None and optional:
        return
    if not isinstance(vector, torch.Tensor):
        allowed = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{op_name} expects {name} as {allowed}, got {type(vector).__name__}")
    if vector.dim() != 1 or vector.shape[0] != length:
        raise ValueError(
            f"{op_name}: {name} must be a 1-D tensor with one entry per {what} ({length}); "
            f"got shape {tuple(vector.shape)}"
        )
    if not vector.is_floating_point():
        raise TypeError(f"{op_name}: {name} must be a floating tensor, got {vector.dtype}")
    if vector.device != x.device:
        raise ValueError(f"{op_name}: {name} is on {vector.device} but x is on {x.device}")


def require_out_like(op_name: str, out: object, like: torch.Tensor, layout: str, like_name: str = "x",
                     like_is_plural: bool = False) -> None:
    """An out= buffer: a 4-D tensor (``layout`` names its dims in messages) of like's dtype and device.

    Messages call ``like`` by ``like_name`` ("x", or "the parts" with ``like_is_plural``).
    """
    has, is_ = ("have", "are") if like_is_plural else ("has", "is")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op_name} expects out to be a torch.Tensor, got {type(out).__name__}")
    if out.dim() != 4:
        raise ValueError(f"{op_name}: out must be a 4-D {layout} tensor; got shape {tuple(out.shape)}")
    if out.dtype != like.dtype:
        raise TypeError(f"{op_name}: out has dtype {out.dtype} but {like_name} {has} {like.dtype}")
    if out.device != like.device:
        raise ValueError(f"{op_name}: out is on {out.device} but {like_name} {is_} on {like.device}")


def require_out_channels(op_name: str, out: torch.Tensor, out_offset: object, channels: int) -> None:
    """Channels [out_offset, out_offset + channels) exist in ``out``."""
    if require_int(op_name, "out_offset", out_offset) < 0 or out_offset + channels > out.shape[1]:
        raise ValueError(
            f"{op_name}: the output needs channels [{out_offset}, {out_offset + channels}) but out has "
            f"{out.shape[1]} channels"
        )
