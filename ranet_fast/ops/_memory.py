"""Memory-layout checks shared by the ops' input validation."""

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
