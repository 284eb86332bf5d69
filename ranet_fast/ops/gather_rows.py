"""gather_rows: compact a whole list of tensors along dim 0 with one index, in one launch.

For tensors ``t_i`` that share ``size(0) = N`` and a 1-D int64 ``index`` of
length ``n`` (values in ``[0, N)``, repeats allowed) the op returns

    out_i = t_i.index_select(0, index)

for every tensor at once. This is the batch compaction of early-exit
inference: after an exit, the samples that leave are dropped from every live
feature map (dozens of tensors of different shapes and dtypes) and from the
positions vector. On a GPU a per-tensor ``index_select`` loop is bound by
launch overhead; the compiled and Triton kernels copy all tensors in one
launch.

Layout. The copy is by bytes (any dtype) and row by row: the kernels need each
sample's elements to form one dense block of memory (any batch stride, any
order of the inner dims: contiguous, channels_last, a 1-D vector...). Each
output keeps its input's order of inner dims in memory, densely packed, with
the batch stride equal to the row's size, so ``out_i[r]`` is a plain memcpy of
``t_i[index[r]]`` and channels_last stays channels_last (see
``output_strides``). An input that is not row-dense (a channel slice, a
strided view such as ``t[..., ::2]``, an expanded inner dim, a tensor with the
batch dim innermost) is first copied whole into that dense layout by the op,
which costs one extra copy of that tensor; the engine's tensors are row-dense
and take no such copy. (A permutation of the inner dims is row-dense.)

Index check. ``check_index=True`` raises IndexError for any value outside
``[0, N)`` before anything is copied; on CUDA this costs one synchronisation
(the index range is read back). ``check_index=False`` skips it on CUDA and in
Triton (an out-of-range value is then undefined behaviour; the CUDA kernel
still has a device-side assert); the CPU kernel checks regardless, which
costs one pass over the indices.

Autograd: differentiable with respect to every floating input; the gradient is
zeros with ``index_add`` of the output gradient's rows (repeated indices sum).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._registry import FUNCTIONAL, Form, OpSpec, register, run, triton_kernels


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


def _validate(tensors: object, index: object) -> list[torch.Tensor]:
    """Checks everything the kernels assume except the index values; returns the tensors as a list."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"gather_rows expects a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("gather_rows needs at least one tensor")
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"gather_rows expects index to be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.int64 or index.dim() != 1:
        raise TypeError(f"gather_rows expects a 1-D int64 index, got one of {_describe(index)}")
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"gather_rows: tensor {position} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dim() < 1:
            raise ValueError(f"gather_rows: tensor {position} must have at least one dimension; it has {_describe(tensor)}")
        if tensor.device != index.device:
            raise ValueError(
                f"gather_rows: tensor {position} ({_describe(tensor)}) is not on the index's device {index.device}"
            )
    rows = tensors[0].shape[0]
    for position, tensor in enumerate(tensors[1:], start=1):
        if tensor.shape[0] != rows:
            raise ValueError(
                f"gather_rows: tensor {position} ({_describe(tensor)}) has {tensor.shape[0]} rows but tensor 0 "
                f"({_describe(tensors[0])}) has {rows}"
            )
    return tensors


def output_strides(shape: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """Strides of the row-dense layout of a tensor of this shape and stride.

    The inner dims (1..) keep their order in memory (larger stride outer; on
    equal strides the lower dim outer) and are packed densely; the batch
    stride is the row's extent. Same rule as row_dense_strides in
    csrc/ops/gather_rows.cpp. Outputs have these strides with ``n`` rows.
    """
    inner = sorted(range(1, len(shape)), key=lambda dim: (-stride[dim], dim))
    result = [0] * len(shape)
    extent = 1
    for dim in reversed(inner):
        result[dim] = extent
        # max(size, 1), as torch's contiguous strides do for empty dims.
        extent *= max(shape[dim], 1)
    result[0] = extent
    return tuple(result)


def is_row_dense(tensor: torch.Tensor) -> bool:
    """Whether each row of ``tensor`` is one dense block laid out as ``output_strides`` says."""
    shape, stride = tuple(tensor.shape), tensor.stride()
    if any(size == 0 for size in shape[1:]):
        return True
    dense = output_strides(shape, stride)
    # A dim of size 1 never moves, so its stride does not matter.
    return all(size == 1 or stride[dim] == dense[dim] for dim, size in enumerate(shape) if dim > 0)


def make_row_dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it is row-dense, else a row-dense copy of all of it."""
    if is_row_dense(tensor):
        return tensor
    dense = torch.empty_strided(tensor.shape, output_strides(tensor.shape, tensor.stride()),
                                dtype=tensor.dtype, device=tensor.device)
    return dense.copy_(tensor)


def allocate_outputs(tensors: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """One uninitialised [rows, *t.shape[1:]] output per input, with ``output_strides`` of the input."""
    return [
        torch.empty_strided((rows, *tensor.shape[1:]), output_strides(tensor.shape, tensor.stride()),
                            dtype=tensor.dtype, device=tensor.device)
        for tensor in tensors
    ]


def check_index_values(index: torch.Tensor, rows: int) -> None:
    """Raises IndexError naming the first value of ``index`` outside [0, rows).

    Reads the index range back to the host: one synchronisation on CUDA.
    """
    if index.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(index)).tolist()
    if low >= 0 and high < rows:
        return
    bad = ((index < 0) | (index >= rows)).nonzero()[0, 0].item()
    raise IndexError(
        f"gather_rows: index[{bad}] = {index[bad].item()} is out of range for tensors of {rows} rows "
        f"(index values must lie in [0, {rows}))"
    )


def gather_rows_reference(
    tensors: Sequence[torch.Tensor], index: torch.Tensor, *, check_index: bool = True
) -> list[torch.Tensor]:
    """Pure-PyTorch gather_rows: ``[t.index_select(0, index) for t in tensors]``.

    The definition the kernels are tested against, and the fallback: one
    index_select per tensor, copied into outputs of the kernels' layout
    (``allocate_outputs``) so that every backend returns the same strides.
    Differentiable through autograd; runs on any device.
    """
    tensors = _validate(tensors, index)
    if check_index:
        check_index_values(index, tensors[0].shape[0])
    outputs = allocate_outputs(tensors, index.shape[0])
    return [out.copy_(tensor.index_select(0, index)) for out, tensor in zip(outputs, tensors)]


# ---------------------------------------------------------------------------
# The spec: fake implementations, autograd, Triton bodies (registered by _registry.register).
# ---------------------------------------------------------------------------


def _fake_gather_rows(tensors, index, check_index=True):
    torch._check(len(tensors) >= 1, lambda: "gather_rows needs at least one tensor")
    return allocate_outputs(tensors, index.shape[0])


def _setup_context(ctx, inputs, output):
    tensors, index, _check_index = inputs
    ctx.save_for_backward(index)
    ctx.inputs = [(tuple(tensor.shape), tensor.dtype, tensor.device) for tensor in tensors]


def _backward(ctx, grad_outputs):
    (index,) = ctx.saved_tensors
    grads = []
    for grad, (shape, dtype, device) in zip(grad_outputs, ctx.inputs):
        if grad is None or not dtype.is_floating_point:
            grads.append(None)
        else:
            # index_add sums the rows of repeated indices; rows never selected get zero.
            grads.append(torch.zeros(shape, dtype=dtype, device=device).index_add(0, index, grad))
    # One gradient per input that reached autograd. The dispatcher drops check_index when it equals
    # its default (True), so the C++ op's autograd function may see two inputs instead of three;
    # torch 2.11's tensor-list wrapper then requires exactly two gradients ("Expected the return
    # from backward to be of the same structure as the inputs"), while torch 2.14 accepts two or
    # three. ctx.needs_input_grad has one entry per input that reached autograd on both.
    return (grads, None, None)[: len(ctx.needs_input_grad)]


def _gather_rows_triton(tensors: list[torch.Tensor], index: torch.Tensor, check_index: bool) -> list[torch.Tensor]:
    if check_index:
        check_index_values(index, tensors[0].shape[0])
    outputs = allocate_outputs(tensors, index.shape[0])
    triton_kernels(SPEC.triton_module).gather_rows_triton(outputs, [make_row_dense(tensor) for tensor in tensors],
                                                          index)
    return outputs


def _gather_rows_reference(tensors: list[torch.Tensor], index: torch.Tensor, check_index: bool) -> list[torch.Tensor]:
    return gather_rows_reference(tensors, index, check_index=check_index)


SPEC = OpSpec("gather_rows", "gather_rows", {
    FUNCTIONAL: Form(triton=_gather_rows_triton, reference=_gather_rows_reference, fake=_fake_gather_rows,
                     backward=_backward, setup_context=_setup_context),
})
register(SPEC)


def gather_rows(
    tensors: Sequence[torch.Tensor],
    index: torch.Tensor,
    *,
    check_index: bool = True,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """``[t.index_select(0, index) for t in tensors]``, all tensors in one kernel launch.

    Args:
        tensors: non-empty list of tensors of dim >= 1, any dtype, all with the
            same size(0) = N and on index's device. Row-dense inputs (contiguous,
            channels_last, 1-D...) are read in place; others are first copied
            whole into a row-dense layout (see the module docstring).
        index: 1-D int64 tensor of n >= 0 row numbers in [0, N); repeats allowed.
        check_index: raise IndexError for out-of-range values before copying
            (one synchronisation on CUDA). False trusts the caller (the
            engine's path): out-of-range values are then undefined behaviour,
            except on the CPU kernel, which always checks.
        backend: None (automatic, or the RANET_FAST_BACKEND environment
            variable), "cuda", "triton", "cpu" or "reference"; see
            ranet_fast._extension.

    Returns:
        New tensors (never aliasing the inputs) of shape [n, *t.shape[1:]],
        with the input's order of inner dims in memory, densely packed, on
        every backend. Differentiable with respect to the floating inputs.
    """
    tensors = _validate(tensors, index)
    return list(run(SPEC, backend, tensors, index, check_index))
