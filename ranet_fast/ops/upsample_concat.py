"""upsample_concat: resize feature maps to one size and write them into channel slices.

For parts ``p_i`` of shape ``[N, C_i, H_i, W_i]``, a target size ``(H, W)`` and
channel offsets ``o_i`` the op writes

    out[:, o_i : o_i + C_i] = resize(p_i, (H, W))

where ``resize`` is ``F.interpolate(mode="bilinear", align_corners=True)`` (up
or down, any factor) and a plain copy when ``(H_i, W_i) == (H, W)``. This is
the ``interpolate`` + ``torch.cat`` ending of RANet's fusion layers and blocks
done in one pass; with ``out=`` it fills only the given slices of a caller's
buffer, so a producer (a conv) may write its own slice directly.

The functional form is differentiable with respect to every part; its
backward (``ranet_fast::upsample_concat_backward``) gathers each input
gradient from the output-gradient elements that read it, so it is
deterministic without atomics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._checks import require_no_overlap, require_out_like
from ._registry import BACKWARD, FUNCTIONAL, OUT, Form, OpSpec, register, run, triton_kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _size_pair(size: object) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
    ):
        raise TypeError(f"upsample_concat expects size as an int or a pair of ints (H, W), got {size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"upsample_concat needs a target size >= 1, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _validate_parts(parts: object) -> list[torch.Tensor]:
    if isinstance(parts, torch.Tensor) or not isinstance(parts, Sequence):
        raise TypeError(
            f"upsample_concat expects a list or tuple of tensors as parts, got {type(parts).__name__}"
        )
    parts = list(parts)
    if not parts:
        raise ValueError("upsample_concat needs at least one part")
    for index, part in enumerate(parts):
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"upsample_concat: part {index} is a {type(part).__name__}, not a torch.Tensor")
        if part.dim() != 4:
            raise ValueError(
                f"upsample_concat: part {index} must be a 4-D [N, C, H, W] tensor; got a "
                f"{part.dim()}-D tensor of shape {tuple(part.shape)}"
            )
        if part.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                "upsample_concat supports float16, bfloat16, float32 and float64 tensors; "
                f"part {index} has dtype {part.dtype}"
            )
        if min(part.shape[1:]) < 1:
            raise ValueError(
                f"upsample_concat: part {index} needs C, H, W >= 1; got shape {tuple(part.shape)}"
            )
    first = parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if part.shape[0] != first.shape[0]:
            raise ValueError(
                f"upsample_concat: part {index} has batch size {part.shape[0]} but part 0 has {first.shape[0]}"
            )
        if part.dtype != first.dtype:
            raise TypeError(f"upsample_concat: part {index} has dtype {part.dtype} but part 0 has {first.dtype}")
        if part.device != first.device:
            raise ValueError(f"upsample_concat: part {index} is on {part.device} but part 0 is on {first.device}")
    return parts


def _validate_offsets(parts: list[torch.Tensor], channel_offsets: object) -> list[int]:
    if channel_offsets is None:
        offsets, start = [], 0
        for part in parts:
            offsets.append(start)
            start += part.shape[1]
        return offsets
    if isinstance(channel_offsets, torch.Tensor) or not isinstance(channel_offsets, Sequence):
        raise TypeError(f"upsample_concat expects channel_offsets as a list of ints, got {channel_offsets!r}")
    offsets = list(channel_offsets)
    if len(offsets) != len(parts):
        raise ValueError(
            f"upsample_concat needs one channel offset per part: got {len(offsets)} offsets for {len(parts)} parts"
        )
    for index, offset in enumerate(offsets):
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError(f"upsample_concat: channel offset {index} must be an int, got {offset!r}")
        if offset < 0:
            raise ValueError(f"upsample_concat: channel offset {index} is negative ({offset})")
    slices = sorted((offset, offset + part.shape[1], index) for index, (offset, part) in enumerate(zip(offsets, parts)))
    for (start, end, index), (next_start, next_end, next_index) in zip(slices, slices[1:]):
        if next_start < end:
            first, second = sorted((index, next_index))
            raise ValueError(
                f"upsample_concat: the channel slices of parts {first} and {second} overlap: "
                f"[{start}, {end}) and [{next_start}, {next_end})"
            )
    return offsets


def _validate(parts, size, channel_offsets, out):
    """Checks everything the kernels assume; returns (parts, (H, W), offsets, channels)."""
    parts = _validate_parts(parts)
    height, width = _size_pair(size)
    offsets = _validate_offsets(parts, channel_offsets)
    ends = [offset + part.shape[1] for offset, part in zip(offsets, parts)]
    if out is None:
        channels = max(ends)
        covered = sum(part.shape[1] for part in parts)
        if covered != channels:
            # Disjoint slices inside [0, channels) that do not add up to it leave a gap.
            raise ValueError(
                f"upsample_concat: the parts must tile the output channels [0, {channels}) exactly, but they "
                f"cover only {covered} of them (slices {sorted(zip(offsets, ends))}); pass out= to fill "
                "only some channels of a buffer"
            )
        return parts, (height, width), offsets, channels
    first = parts[0]
    require_out_like("upsample_concat", out, first, "[N, C, H, W]", like_name="the parts", like_is_plural=True)
    if out.shape[0] != first.shape[0] or tuple(out.shape[2:]) != (height, width):
        raise ValueError(
            f"upsample_concat: out has shape {tuple(out.shape)} but must be [{first.shape[0]}, C, {height}, "
            f"{width}] for {first.shape[0]} samples resized to {(height, width)}"
        )
    for index, (offset, end) in enumerate(zip(offsets, ends)):
        if end > out.shape[1]:
            raise ValueError(
                f"upsample_concat: part {index} needs channels [{offset}, {end}) but out has {out.shape[1]} channels"
            )
    require_no_overlap("upsample_concat", "out", out)
    return parts, (height, width), offsets, out.shape[1]


def _output_memory_format(first_part: torch.Tensor) -> torch.memory_format:
    # Same rule as allocate_upsample_concat_output in csrc/ops/upsample_concat.cpp.
    if first_part.is_contiguous(memory_format=torch.channels_last) and not first_part.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _allocate_output(parts, channels: int, height: int, width: int) -> torch.Tensor:
    first = parts[0]
    return torch.empty(
        (first.shape[0], channels, height, width),
        dtype=first.dtype,
        device=first.device,
        memory_format=_output_memory_format(first),
    )


def upsample_concat_reference(
    parts: Sequence[torch.Tensor],
    size: int | Sequence[int],
    *,
    channel_offsets: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch upsample_concat: the definition the kernels are tested against.

    ``F.interpolate(mode="bilinear", align_corners=True)`` for each part whose
    size differs from ``size``, the part itself otherwise, each copied into its
    channel slice. Differentiable through autograd; runs on any device.
    """
    parts, (height, width), offsets, channels = _validate(parts, size, channel_offsets, out)
    if out is None:
        out = _allocate_output(parts, channels, height, width)
    return _write_resized(out, parts, offsets)


def _write_resized(out: torch.Tensor, parts: list[torch.Tensor], channel_offsets: list[int]) -> torch.Tensor:
    """The reference's computation on validated arguments: each part resized to out's size, into its slice."""
    size = tuple(out.shape[2:])
    for part, offset in zip(parts, channel_offsets):
        if tuple(part.shape[2:]) != size:
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=True)
        out.narrow(1, offset, part.shape[1]).copy_(part)
    return out


def _reference(parts: list[torch.Tensor], channel_offsets: list[int], channels: int, height: int, width: int):
    return _write_resized(_allocate_output(parts, channels, height, width), parts, channel_offsets)


def _reference_out(out: torch.Tensor, parts: list[torch.Tensor], channel_offsets: list[int]) -> torch.Tensor:
    return _write_resized(out, parts, channel_offsets)


def _backward_reference(grad_output, channel_offsets, part_channels, part_heights, part_widths):
    """Each part's gradient: its channel slice of grad_output, through bilinear resizing's backward."""
    size = list(grad_output.shape[2:])
    gradients = []
    for offset, channels, height, width in zip(channel_offsets, part_channels, part_heights, part_widths):
        sliced = grad_output.narrow(1, offset, channels)
        if [height, width] == size:
            gradients.append(sliced.clone(memory_format=_gradient_memory_format(grad_output)))
        else:
            gradients.append(torch.ops.aten.upsample_bilinear2d_backward(
                sliced, size, [grad_output.shape[0], channels, height, width], True))
    return gradients


# ---------------------------------------------------------------------------
# The spec: fake implementations, autograd, Triton bodies (registered by _registry.register).
# ---------------------------------------------------------------------------


def _fake_upsample_concat(parts, channel_offsets, channels, height, width):
    torch._check(len(parts) >= 1, lambda: "upsample_concat needs at least one part")
    return _allocate_output(parts, channels, height, width)


def _fake_upsample_concat_out(out, parts, channel_offsets):
    return None


def _gradient_memory_format(grad_output: torch.Tensor) -> torch.memory_format:
    # Same rule as upsample_concat_gradients_channels_last in
    # csrc/ops/upsample_concat.cpp and gradient_memory_format in
    # kernels/upsample_concat.py: channels_last part gradients when
    # grad_output's channels are innermost in memory.
    if grad_output.shape[1] > 1 and grad_output.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


def _fake_upsample_concat_backward(grad_output, channel_offsets, part_channels, part_heights, part_widths):
    batch = grad_output.shape[0]
    memory_format = _gradient_memory_format(grad_output)
    return [
        torch.empty(
            (batch, channels, height, width),
            dtype=grad_output.dtype,
            device=grad_output.device,
            memory_format=memory_format,
        )
        for channels, height, width in zip(part_channels, part_heights, part_widths)
    ]


def _setup_context(ctx, inputs, output):
    parts, channel_offsets, _channels, _height, _width = inputs
    ctx.channel_offsets = list(channel_offsets)
    ctx.part_channels = [part.shape[1] for part in parts]
    ctx.part_heights = [part.shape[2] for part in parts]
    ctx.part_widths = [part.shape[3] for part in parts]


def _backward(ctx, grad_output):
    backward = ctx.same_backend(BACKWARD)
    part_gradients = backward(grad_output, ctx.channel_offsets, ctx.part_channels, ctx.part_heights, ctx.part_widths)
    return list(part_gradients), None, None, None, None


def _setup_backward_context(ctx, inputs, output):
    grad_output, channel_offsets, part_channels, part_heights, part_widths = inputs
    ctx.grad_output_shape = tuple(grad_output.shape)
    ctx.dtype, ctx.device = grad_output.dtype, grad_output.device
    ctx.channel_offsets = list(channel_offsets)
    ctx.part_shapes = list(zip(part_channels, part_heights, part_widths))


def _double_backward(ctx, part_gradient_grads):
    """Gradient of the backward op with respect to grad_output.

    The backward is linear in grad_output and its transpose is the forward:
    each incoming gradient resized to the output size in its channel slice,
    zeros elsewhere. Zero parts fill the channels no part covers (a direct
    call of the backward op on some channels only), since the functional op
    needs slices that tile the channels.
    """
    batch, channels, height, width = ctx.grad_output_shape
    parts, offsets = [], list(ctx.channel_offsets)
    for grad, shape in zip(part_gradient_grads, ctx.part_shapes):
        parts.append(torch.zeros((batch, *shape), dtype=ctx.dtype, device=ctx.device) if grad is None else grad)
    covered_until = 0
    for offset, part_channels in sorted((offset, shape[0]) for offset, shape in zip(ctx.channel_offsets, ctx.part_shapes)):
        if offset > covered_until:
            parts.append(torch.zeros((batch, offset - covered_until, height, width), dtype=ctx.dtype, device=ctx.device))
            offsets.append(covered_until)
        covered_until = offset + part_channels
    if covered_until < channels:
        parts.append(torch.zeros((batch, channels - covered_until, height, width), dtype=ctx.dtype, device=ctx.device))
        offsets.append(covered_until)
    functional = ctx.same_backend(FUNCTIONAL)
    return functional(parts, offsets, channels, height, width), None, None, None, None


# The Triton twins' bodies.


def _upsample_concat_triton(
    parts: list[torch.Tensor], channel_offsets: list[int], channels: int, height: int, width: int
) -> torch.Tensor:
    out = _allocate_output(parts, channels, height, width)
    _upsample_concat_triton_out(out, parts, channel_offsets)
    return out


def _upsample_concat_triton_out(out: torch.Tensor, parts: list[torch.Tensor], channel_offsets: list[int]) -> None:
    triton_kernels(SPEC.triton_module).upsample_concat_forward_triton(out, parts, channel_offsets)


def _upsample_concat_triton_backward(
    grad_output: torch.Tensor,
    channel_offsets: list[int],
    part_channels: list[int],
    part_heights: list[int],
    part_widths: list[int],
) -> list[torch.Tensor]:
    part_shapes = list(zip(part_channels, part_heights, part_widths))
    return list(triton_kernels(SPEC.triton_module).upsample_concat_backward_triton(grad_output, channel_offsets,
                                                                                   part_shapes))


SPEC = OpSpec("upsample_concat", "upsample_concat", {
    FUNCTIONAL: Form(triton=_upsample_concat_triton, reference=_reference, fake=_fake_upsample_concat,
                     backward=_backward, setup_context=_setup_context),
    OUT: Form(triton=_upsample_concat_triton_out, reference=_reference_out, fake=_fake_upsample_concat_out,
              mutates_args=("out",)),
    BACKWARD: Form(triton=_upsample_concat_triton_backward, reference=_backward_reference,
                   fake=_fake_upsample_concat_backward, backward=_double_backward,
                   setup_context=_setup_backward_context),
})
register(SPEC)


def upsample_concat_backward(
    grad_output: torch.Tensor,
    part_shapes: Sequence[tuple[int, int, int]],
    channel_offsets: Sequence[int],
    *,
    backend: str | None = None,
) -> list[torch.Tensor]:
    """The gradient of each part of ``upsample_concat(parts, ..., channel_offsets=...)`` from ``grad_output``.

    ``part_shapes`` are the parts' (C, H, W). For layers that write a buffer with ``out=`` inside
    their own autograd.Function and need the op's backward directly; the functional form's autograd
    calls the same kernels. ``grad_output`` may have any strides and more channels than the parts
    cover (the other channels are ignored).
    """
    part_shapes = [tuple(int(v) for v in shape) for shape in part_shapes]
    offsets = [int(offset) for offset in channel_offsets]
    if len(part_shapes) != len(offsets) or not part_shapes:
        raise ValueError(
            f"upsample_concat_backward: got {len(part_shapes)} part shapes and {len(offsets)} channel offsets; "
            "give one offset per part (at least one part)"
        )
    if grad_output.dim() != 4:
        raise ValueError(f"upsample_concat_backward expects grad_output [N, C, H, W]; got shape {tuple(grad_output.shape)}")
    for (channels, _, _), offset in zip(part_shapes, offsets):
        if offset < 0 or offset + channels > grad_output.shape[1]:
            raise ValueError(
                f"upsample_concat_backward: a part needs channels [{offset}, {offset + channels}) but grad_output "
                f"has {grad_output.shape[1]}"
            )
    channels, heights, widths = (list(values) for values in zip(*part_shapes))
    return list(run(SPEC, backend, grad_output, offsets, channels, heights, widths, form=BACKWARD))


def upsample_concat(
    parts: Sequence[torch.Tensor],
    size: int | Sequence[int],
    *,
    channel_offsets: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Bilinearly resize each part to ``size`` and write it into its channel slice.

    Args:
        parts: non-empty list of [N, C_i, H_i, W_i] tensors of one dtype
            (float16/bfloat16/float32/float64), device and batch size; any
            strides (NCHW, channels_last, non-contiguous views).
        size: target (H, W), or an int for a square size; >= 1.
        channel_offsets: first output channel of each part; default
            consecutive from 0 in the order of ``parts``. Slices must not overlap.
        out: None -> a new [N, sum C_i, H, W] tensor (channels_last when
            parts[0] is), which the parts must tile exactly; differentiable
            with respect to every part. Otherwise a [N, C, H, W] buffer of the
            parts' dtype and device, any strides (e.g. a channel slice of a
            bigger buffer): only the parts' slices are written and ``out`` is
            returned. The out= form is not differentiable.
        backend: None (automatic, or the RANET_FAST_BACKEND environment
            variable), "cuda", "triton", "cpu" or "reference"; see
            ranet_fast._extension.
    """
    parts, (height, width), offsets, channels = _validate(parts, size, channel_offsets, out)
    if out is None:
        return run(SPEC, backend, parts, offsets, channels, height, width)
    if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (*parts, out)):
        raise RuntimeError(
            "upsample_concat: the out= form is not differentiable, but a part or out requires grad; "
            "call it without out= (or under torch.no_grad() if no gradient is needed)"
        )
    run(SPEC, backend, out, parts, offsets, form=OUT)
    return out
