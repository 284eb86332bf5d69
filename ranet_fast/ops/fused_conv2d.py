"""fused_conv2d: a 2-D convolution with an affine+activation prologue and epilogue, written into a channel slice.

For an input ``x`` [N, Ci, H, W], a weight [Co, Ci, k, k], stride ``s`` and padding ``p`` the op computes

    z = prologue_act(x * prologue_scale[ci] + prologue_shift[ci])    (only with a prologue, else z = x)
    y[:, out_offset + co] = act(epilogue_scale[co] * conv2d(z, weight, s, p)[co] + epilogue_shift[co])

where ``prologue_act`` (``prologue_activation``, ReLU by default) and ``act`` (``activation``, none
by default) are named by ``ACTIVATIONS``: none, relu, relu6, silu, gelu (the erf form, nn.GELU's
default), hardswish, leaky_relu (with ``negative_slope``), each as torch.nn.functional defines it.
The prologue applies to the real input elements only: the zero padding stays zero, exactly as in
eager BN -> act -> conv. A missing epilogue scale means 1 and a missing shift 0.

With BatchNorm in eval mode folded into (scale, shift) this is RANet's conv -> BN -> ReLU
(epilogue form, the official ConvBasic/ConvBN) and BN -> ReLU -> conv (prologue form, ConvBN
with ``bnAfter=False``) in one pass over the data: no normalised tensor is written, and with
``out=`` the result lands directly in the channels of a dense block's buffer. ``x`` may have any
strides, in particular a channel prefix ``buffer[:, :Ci]`` of a bigger NCHW or channels_last
buffer, which the kernels read in place.

Accumulation is in float32 (float64 for float64 tensors). Scales and shifts are kept in that
accumulation type (the wrapper casts them), so folded BatchNorm parameters keep their precision
for float16/bfloat16 activations.

With ``stats_sum`` and ``stats_sumsq`` ([Co] of the accumulation type) the op also stores the
per-channel sum and sum of squares over (N, Ho, Wo) of the output it writes (as written, in its
dtype), which is what the next BatchNorm's batch statistics need (the "conv + genstats" pattern of
training): mean = sum / count, var = sumsq / count - mean**2. That is the form
``fused_conv2d_stats_out``: not differentiable.

The functional form is differentiable with respect to ``x``, ``weight`` and every scale and shift;
the backward is composed of aten ops (``aten.convolution_backward`` for the conv), shared by the
compiled and the Triton backends. The ``out=`` form is not differentiable.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ._checks import require_channel_vector, require_int, require_out_channels, require_out_like
from ._registry import FUNCTIONAL, OUT, Form, OpSpec, register, run, triton_kernels

OP_NAME = "fused_conv2d"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_STRIDES = (1, 2)
# Form suffix of the op that also stores per-channel statistics of its output (fused_conv2d_stats_out).
STATS_OUT = "_stats_out"
# The activations of the prologue and the epilogue. The compiled and Triton kernels take each as its
# index here (csrc/ops/fused_conv2d_math.h's Activation, kernels/fused_conv2d.py's constexprs).
ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "hardswish", "leaky_relu")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in, and the dtype of the scales and shifts they read."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def activation_code(name: str, argument: str = "activation") -> int:
    """The kernels' code of an activation name; a ValueError naming the allowed ones for anything else."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"fused_conv2d: {argument} must be one of {', '.join(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS.index(name)


def _validate_negative_slope(negative_slope) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)) or not math.isfinite(
            negative_slope):
        raise ValueError(f"fused_conv2d: negative_slope must be a finite number, got {negative_slope!r}")
    return float(negative_slope)


def _validate(x, weight, stride, padding, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift,
              out, out_offset) -> tuple[int, int]:
    """Checks everything the kernels assume; returns the output size (Ho, Wo)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fused_conv2d expects x as a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"fused_conv2d expects weight as a torch.Tensor, got {type(weight).__name__}")
    if x.dim() != 4:
        raise ValueError(f"fused_conv2d expects x of shape [N, Ci, H, W]; got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"fused_conv2d expects weight of shape [Co, Ci, k, k]; got shape {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused_conv2d supports float16, bfloat16, float32 and float64 inputs; x has dtype {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"fused_conv2d: weight has dtype {weight.dtype} but x has {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"fused_conv2d: weight is on {weight.device} but x is on {x.device}")
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    if in_channels != x.shape[1]:
        raise ValueError(
            f"fused_conv2d: weight {tuple(weight.shape)} expects {in_channels} input channels but x "
            f"{tuple(x.shape)} has {x.shape[1]}"
        )
    if kernel_h != kernel_w or kernel_h < 1:
        raise ValueError(f"fused_conv2d supports square kernels only; weight has a {kernel_h}x{kernel_w} kernel")
    if out_channels < 1 or in_channels < 1:
        raise ValueError(f"fused_conv2d needs Co, Ci >= 1; weight has shape {tuple(weight.shape)}")
    if require_int(OP_NAME, "stride", stride) not in SUPPORTED_STRIDES:
        raise ValueError(f"fused_conv2d supports stride 1 or 2, got {stride}")
    if require_int(OP_NAME, "padding", padding) not in (0, (kernel_h - 1) // 2):
        raise ValueError(
            f"fused_conv2d supports padding 0 or (k - 1) // 2 = {(kernel_h - 1) // 2} for a {kernel_h}x{kernel_h} "
            f"kernel, got {padding}"
        )
    height, width = output_size(x.shape[2], kernel_h, stride, padding), output_size(x.shape[3], kernel_h, stride, padding)
    if height < 1 or width < 1:
        raise ValueError(
            f"fused_conv2d: a {kernel_h}x{kernel_h} kernel with stride {stride} and padding {padding} leaves no output "
            f"for an input of size {tuple(x.shape[2:])}"
        )
    if (prologue_scale is None) != (prologue_shift is None):
        raise ValueError("fused_conv2d: give prologue_scale and prologue_shift together (or neither)")
    for name, vector, length, what in (("prologue_scale", prologue_scale, in_channels, "input channel"),
                                       ("prologue_shift", prologue_shift, in_channels, "input channel"),
                                       ("epilogue_scale", epilogue_scale, out_channels, "output channel"),
                                       ("epilogue_shift", epilogue_shift, out_channels, "output channel")):
        require_channel_vector(OP_NAME, name, vector, length, x, what, optional=True)
    if out is None:
        if out_offset != 0:
            raise ValueError(f"fused_conv2d: out_offset ({out_offset}) needs out=")
        return height, width
    require_out_like(OP_NAME, out, x, "[N, C, Ho, Wo]")
    if out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != (height, width):
        raise ValueError(
            f"fused_conv2d: out has shape {tuple(out.shape)} but must be [{x.shape[0]}, C, {height}, {width}] "
            f"for this input and convolution"
        )
    require_out_channels(OP_NAME, out, out_offset, out_channels)
    return height, width


def _validate_statistics(stats_sum, stats_sumsq, x: torch.Tensor, out_channels: int) -> None:
    if (stats_sum is None) != (stats_sumsq is None):
        raise ValueError("fused_conv2d: give stats_sum and stats_sumsq together (or neither)")
    if stats_sum is None:
        return
    accumulation = accumulation_dtype(x.dtype)
    for name, vector in (("stats_sum", stats_sum), ("stats_sumsq", stats_sumsq)):
        require_channel_vector(OP_NAME, name, vector, out_channels, x, "output channel")
        if vector.dtype != accumulation or not vector.is_contiguous():
            raise ValueError(f"fused_conv2d: {name} must be a contiguous {accumulation} tensor (the accumulation "
                             f"dtype of {x.dtype} inputs); got {vector.dtype}, strides {vector.stride()}")
    if stats_sum.data_ptr() == stats_sumsq.data_ptr():
        raise ValueError("fused_conv2d: stats_sum and stats_sumsq must be different tensors")


def store_channel_statistics(out_slice: torch.Tensor, stats_sum: torch.Tensor, stats_sumsq: torch.Tensor) -> None:
    """stats_sum[c] = sum of out_slice[:, c] and stats_sumsq[c] = sum of its squares, in the statistics' dtype."""
    values = out_slice.to(stats_sum.dtype)
    stats_sum.copy_(values.sum((0, 2, 3)))
    stats_sumsq.copy_(values.square().sum((0, 2, 3)))


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x's channels are innermost in memory (channels_last, or a channel slice of it).

    Same rule as fused_conv2d_channels_last in csrc/ops/fused_conv2d.cpp.
    """
    if x.shape[1] > 1 and x.stride(1) == 1:
        return torch.channels_last
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _allocate_output(x: torch.Tensor, out_channels: int, height: int, width: int) -> torch.Tensor:
    return torch.empty(
        (x.shape[0], out_channels, height, width), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x)
    )


def _as_accumulation(vector: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """vector in the accumulation dtype, dense: the kernels index it as a plain array."""
    return None if vector is None else vector.to(accumulation_dtype(x.dtype)).contiguous()


def activate(value: torch.Tensor, code: int, negative_slope: float) -> torch.Tensor:
    """Activation ``ACTIVATIONS[code]`` of value, as torch.nn.functional computes it."""
    return _ACTIVATION_FUNCTIONS[code](value, negative_slope)


def activate_(value: torch.Tensor, code: int, negative_slope: float) -> torch.Tensor:
    """:func:`activate` written over ``value`` (the same aten kernels, in-place forms): for a result
    nothing else reads and autograd does not track, it saves the allocation of a second tensor and
    its first touch, which on a CPU costs more than the activation itself at small sizes."""
    return _ACTIVATION_FUNCTIONS_IN_PLACE[code](value, negative_slope)


# Indexed by the kernels' activation code (ACTIVATIONS); the same functions torch.nn's modules call.
_ACTIVATION_FUNCTIONS = (
    lambda v, slope: v,
    lambda v, slope: F.relu(v),
    lambda v, slope: F.relu6(v),
    lambda v, slope: F.silu(v),
    lambda v, slope: F.gelu(v),
    lambda v, slope: F.hardswish(v),
    F.leaky_relu,
)
_ACTIVATION_FUNCTIONS_IN_PLACE = (
    lambda v, slope: v,
    lambda v, slope: torch.relu_(v),
    lambda v, slope: F.hardtanh_(v, 0.0, 6.0),
    lambda v, slope: F.silu(v, inplace=True),
    lambda v, slope: torch.ops.aten.gelu_(v),
    lambda v, slope: F.hardswish(v, inplace=True),
    F.leaky_relu_,
)


def activation_backward(grad: torch.Tensor, pre_activation: torch.Tensor, code: int,
                        negative_slope: float) -> torch.Tensor:
    """grad * act'(pre_activation) with eager's derivative of ``ACTIVATIONS[code]`` (its aten backward op)."""
    name = ACTIVATIONS[code]
    aten = torch.ops.aten
    if name == "none":
        return grad
    if name == "relu":
        return aten.threshold_backward(grad, pre_activation, 0)
    if name == "relu6":
        return aten.hardtanh_backward(grad, pre_activation, 0.0, 6.0)
    if name == "silu":
        return aten.silu_backward(grad, pre_activation)
    if name == "gelu":
        return aten.gelu_backward(grad, pre_activation)
    if name == "hardswish":
        return aten.hardswish_backward(grad, pre_activation)
    return aten.leaky_relu_backward(grad, pre_activation, negative_slope, False)


def _prologue_pre_activation(x, prologue_scale, prologue_shift):
    """x * scale + shift in the accumulation type."""
    return x.to(prologue_scale.dtype) * prologue_scale.view(1, -1, 1, 1) + prologue_shift.view(1, -1, 1, 1)


def _prologue(x, prologue_scale, prologue_shift, prologue_activation, negative_slope):
    """act(x * scale + shift) in the accumulation type, rounded to x's dtype (what the conv reads)."""
    if prologue_scale is None:
        return x
    return activate(_prologue_pre_activation(x, prologue_scale, prologue_shift), prologue_activation,
                    negative_slope).to(x.dtype)


def _epilogue_pre_activation(conv, epilogue_scale, epilogue_shift):
    """scale * conv + shift in the accumulation type."""
    y = conv.to(accumulation_dtype(conv.dtype))
    if epilogue_scale is not None:
        y = y * epilogue_scale.view(1, -1, 1, 1)
    if epilogue_shift is not None:
        y = y + epilogue_shift.view(1, -1, 1, 1)
    return y


def fused_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    epilogue_scale: torch.Tensor | None = None,
    epilogue_shift: torch.Tensor | None = None,
    activation: str = "none",
    prologue_activation: str = "relu",
    negative_slope: float = 0.01,
    out: torch.Tensor | None = None,
    out_offset: int = 0,
) -> torch.Tensor:
    """Pure-PyTorch fused_conv2d: the definition the kernels are tested against.

    ``F.conv2d`` between the prologue and the epilogue, which are computed in the accumulation
    type with torch.nn.functional's activations (the conv itself runs in x's dtype, as eager
    does). Differentiable through autograd; runs on any device.
    """
    prologue_code, code = activation_code(prologue_activation, "prologue_activation"), activation_code(activation)
    negative_slope = _validate_negative_slope(negative_slope)
    height, width = _validate(x, weight, stride, padding, prologue_scale, prologue_shift, epilogue_scale,
                              epilogue_shift, out, out_offset)
    prologue_scale, prologue_shift = _as_accumulation(prologue_scale, x), _as_accumulation(prologue_shift, x)
    epilogue_scale, epilogue_shift = _as_accumulation(epilogue_scale, x), _as_accumulation(epilogue_shift, x)
    conv = F.conv2d(_prologue(x, prologue_scale, prologue_shift, prologue_code, negative_slope), weight, stride=stride,
                    padding=padding)
    y = activate(_epilogue_pre_activation(conv, epilogue_scale, epilogue_shift), code, negative_slope).to(x.dtype)
    if out is None:
        return y.contiguous(memory_format=output_memory_format(x))
    out.narrow(1, out_offset, weight.shape[0]).copy_(y)
    return out


# ---------------------------------------------------------------------------
# The spec: fake implementations, autograd, Triton bodies (registered by _registry.register).
# ---------------------------------------------------------------------------

_RELU, _NONE = ACTIVATIONS.index("relu"), ACTIVATIONS.index("none")


def _fake_fused_conv2d(x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride, padding,
                       prologue_activation, activation, negative_slope):
    kernel = weight.shape[2]
    return _allocate_output(
        x, weight.shape[0], output_size(x.shape[2], kernel, stride, padding), output_size(x.shape[3], kernel, stride, padding)
    )


def _fake_fused_conv2d_out(out, x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride,
                           padding, prologue_activation, activation, negative_slope, out_offset):
    return None


def _fake_fused_conv2d_stats_out(out, stats_sum, stats_sumsq, x, weight, prologue_scale, prologue_shift,
                                 epilogue_scale, epilogue_shift, stride, padding, prologue_activation, activation,
                                 negative_slope, out_offset):
    return None


def _setup_context(ctx, inputs, output):
    (x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride, padding, prologue_activation,
     activation, negative_slope) = inputs
    ctx.stride, ctx.padding = stride, padding
    ctx.prologue_activation, ctx.activation, ctx.negative_slope = prologue_activation, activation, negative_slope
    ctx.has_prologue = prologue_scale is not None
    ctx.has_epilogue_scale = epilogue_scale is not None
    ctx.has_epilogue_shift = epilogue_shift is not None
    # None entries are saved as empty placeholders: save_for_backward takes tensors only.
    placeholder = x.new_empty(0)
    ctx.save_for_backward(
        x,
        weight,
        prologue_scale if ctx.has_prologue else placeholder,
        prologue_shift if ctx.has_prologue else placeholder,
        epilogue_scale if ctx.has_epilogue_scale else placeholder,
        epilogue_shift if ctx.has_epilogue_shift else placeholder,
        # ReLU's derivative is read from the output (y > 0 where the pre-activation is); the other
        # activations recompute the pre-activation. Not saving the output otherwise lets code after
        # the conv write into it in place (``y += identity`` after conv -> BN), as eager allows.
        output if activation == _RELU else placeholder,
    )


def _backward(ctx, grad_output):
    """Gradients of x, weight, the prologue's and the epilogue's scale and shift, from aten ops.

    With a = x * ps + ph, z = pact(a), c = conv(z), e = es * c + eh, y = act(e):
    g = act'(e) * grad_y (ReLU's mask from y > 0; the others from e, recomputed); d/d(es) = sum(g * c),
    d/d(eh) = sum(g); the conv's input and weight gradients come from aten.convolution_backward on
    g * es; with grad_a = pact'(a) * grad_z: d/dx = grad_a * ps, d/d(ps) = sum(grad_a * x),
    d/d(ph) = sum(grad_a). Each derivative is eager's own (activation_backward).
    """
    x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, output = ctx.saved_tensors
    needs = ctx.needs_input_grad
    acc = accumulation_dtype(x.dtype)
    g = grad_output.to(acc)
    z = (_prologue(x, prologue_scale, prologue_shift, ctx.prologue_activation, ctx.negative_slope)
         if ctx.has_prologue else x)
    conv = None
    if ctx.activation == _RELU:
        g = torch.where(output > 0, g, torch.zeros((), dtype=acc, device=g.device))
    elif ctx.activation != _NONE:
        conv = F.conv2d(z, weight, stride=ctx.stride, padding=ctx.padding).to(acc)
        pre_activation = _epilogue_pre_activation(conv, epilogue_scale if ctx.has_epilogue_scale else None,
                                                  epilogue_shift if ctx.has_epilogue_shift else None)
        g = activation_backward(g, pre_activation, ctx.activation, ctx.negative_slope)
    grad_epilogue_scale = grad_epilogue_shift = None
    if ctx.has_epilogue_scale and needs[4]:
        if conv is None:
            conv = F.conv2d(z, weight, stride=ctx.stride, padding=ctx.padding).to(acc)
        grad_epilogue_scale = (g * conv).sum((0, 2, 3))
    if ctx.has_epilogue_shift and needs[5]:
        grad_epilogue_shift = g.sum((0, 2, 3))
    grad_x = grad_weight = grad_prologue_scale = grad_prologue_shift = None
    need_z = needs[0] or (ctx.has_prologue and (needs[2] or needs[3]))
    if need_z or needs[1]:
        grad_conv = g * epilogue_scale.view(1, -1, 1, 1) if ctx.has_epilogue_scale else g
        grad_z, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_conv.to(x.dtype), z, weight, None, [ctx.stride] * 2, [ctx.padding] * 2, [1, 1], False, [0, 0], 1,
            [need_z, needs[1], False],
        )
        if need_z and ctx.has_prologue:
            grad_a = activation_backward(grad_z.to(acc), _prologue_pre_activation(x, prologue_scale, prologue_shift),
                                         ctx.prologue_activation, ctx.negative_slope)
            grad_x = (grad_a * prologue_scale.view(1, -1, 1, 1)).to(x.dtype) if needs[0] else None
            grad_prologue_scale = (grad_a * x.to(acc)).sum((0, 2, 3)) if needs[2] else None
            grad_prologue_shift = grad_a.sum((0, 2, 3)) if needs[3] else None
        elif needs[0]:
            grad_x = grad_z
    return (grad_x, grad_weight, grad_prologue_scale, grad_prologue_shift, grad_epilogue_scale, grad_epilogue_shift,
            None, None, None, None, None)


def _fused_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    prologue_scale: torch.Tensor | None,
    prologue_shift: torch.Tensor | None,
    epilogue_scale: torch.Tensor | None,
    epilogue_shift: torch.Tensor | None,
    stride: int,
    padding: int,
    prologue_activation: int,
    activation: int,
    negative_slope: float,
) -> torch.Tensor:
    out = _fake_fused_conv2d(x, weight, None, None, None, None, stride, padding, prologue_activation, activation,
                             negative_slope)
    _fused_conv2d_triton_out(out, x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride,
                             padding, prologue_activation, activation, negative_slope, 0)
    return out


def _fused_conv2d_triton_out(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    prologue_scale: torch.Tensor | None,
    prologue_shift: torch.Tensor | None,
    epilogue_scale: torch.Tensor | None,
    epilogue_shift: torch.Tensor | None,
    stride: int,
    padding: int,
    prologue_activation: int,
    activation: int,
    negative_slope: float,
    out_offset: int,
) -> None:
    triton_kernels(SPEC.triton_module).fused_conv2d_triton(
        out, x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride, padding,
        prologue_activation, activation, negative_slope, out_offset,
    )


def _fused_conv2d_triton_stats_out(
    out: torch.Tensor,
    stats_sum: torch.Tensor,
    stats_sumsq: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    prologue_scale: torch.Tensor | None,
    prologue_shift: torch.Tensor | None,
    epilogue_scale: torch.Tensor | None,
    epilogue_shift: torch.Tensor | None,
    stride: int,
    padding: int,
    prologue_activation: int,
    activation: int,
    negative_slope: float,
    out_offset: int,
) -> None:
    triton_kernels(SPEC.triton_module).fused_conv2d_triton(
        out, x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride, padding,
        prologue_activation, activation, negative_slope, out_offset, stats_sum=stats_sum, stats_sumsq=stats_sumsq,
    )


def _reference_stats_out(out, stats_sum, stats_sumsq, x, weight, prologue_scale, prologue_shift, epilogue_scale,
                         epilogue_shift, stride, padding, prologue_activation, activation, negative_slope, out_offset):
    """The out= reference, then the statistics of the channels it wrote."""
    _reference_out(out, x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride, padding,
                   prologue_activation, activation, negative_slope, out_offset)
    store_channel_statistics(out.narrow(1, out_offset, weight.shape[0]), stats_sum, stats_sumsq)


def _reference_out(out, x, weight, prologue_scale, prologue_shift, epilogue_scale, epilogue_shift, stride, padding,
                   prologue_activation, activation, negative_slope, out_offset=0):
    """fused_conv2d_reference with the compiled ops' arguments; ``out=None`` is the functional form."""
    return fused_conv2d_reference(x, weight, stride=stride, padding=padding, prologue_scale=prologue_scale,
                                  prologue_shift=prologue_shift, epilogue_scale=epilogue_scale,
                                  epilogue_shift=epilogue_shift, activation=ACTIVATIONS[activation],
                                  prologue_activation=ACTIVATIONS[prologue_activation],
                                  negative_slope=negative_slope, out=out, out_offset=out_offset)


SPEC = OpSpec(OP_NAME, "fused_conv2d", {
    FUNCTIONAL: Form(triton=_fused_conv2d_triton, reference=functools.partial(_reference_out, None),
                     fake=_fake_fused_conv2d, backward=_backward, setup_context=_setup_context),
    OUT: Form(triton=_fused_conv2d_triton_out, reference=_reference_out, fake=_fake_fused_conv2d_out,
              mutates_args=("out",)),
    STATS_OUT: Form(triton=_fused_conv2d_triton_stats_out, reference=_reference_stats_out,
                    fake=_fake_fused_conv2d_stats_out, mutates_args=("out", "stats_sum", "stats_sumsq")),
})
register(SPEC)


def fused_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    prologue_scale: torch.Tensor | None = None,
    prologue_shift: torch.Tensor | None = None,
    epilogue_scale: torch.Tensor | None = None,
    epilogue_shift: torch.Tensor | None = None,
    activation: str = "none",
    prologue_activation: str = "relu",
    negative_slope: float = 0.01,
    out: torch.Tensor | None = None,
    out_offset: int = 0,
    stats_sum: torch.Tensor | None = None,
    stats_sumsq: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(epilogue_scale * conv2d(prologue(x), weight) + epilogue_shift)``, optionally into a channel slice.

    Args:
        x: [N, Ci, H, W], float16/bfloat16/float32/float64, any strides (NCHW, channels_last, a
            channel prefix of a bigger buffer, other non-contiguous views); N >= 0.
        weight: [Co, Ci, k, k] of x's dtype and device (no groups, no dilation, no bias: fold a
            bias into ``epilogue_shift``).
        stride: 1 or 2. padding: 0 or (k - 1) // 2.
        prologue_scale, prologue_shift: [Ci] each, together or not at all: the conv reads
            prologue_activation(x * scale + shift) (zero padding stays zero), e.g. a folded
            eval-mode BN -> ReLU.
        epilogue_scale, epilogue_shift: [Co] each, each optional (1 and 0 when missing).
            Every scale and shift is cast to float32 (float64 for float64 x), the kernels'
            accumulation type, before the kernels see it.
        activation: applied after the epilogue; one of ``ACTIVATIONS``.
        prologue_activation: applied after the prologue's scale and shift (used only with a
            prologue); one of ``ACTIVATIONS``.
        negative_slope: leaky_relu's slope, in the prologue and the epilogue alike.
        out: None -> a new [N, Co, Ho, Wo] tensor (channels_last when x's channels are innermost);
            differentiable with respect to x, weight and every scale and shift. Otherwise a
            [N, C, Ho, Wo] buffer of x's dtype and device, any strides, of which only channels
            [out_offset, out_offset + Co) are written; it is returned. The written channels must
            not overlap the memory x is read from. The out= form is not differentiable.
        out_offset: first output channel written in ``out``.
        stats_sum, stats_sumsq: together or not at all: contiguous [Co] tensors of the
            accumulation dtype on x's device that receive (are overwritten with) the per-channel
            sum and sum of squares over (N, Ho, Wo) of the output written (zero when N == 0), for
            the next BatchNorm's batch statistics. With them the call is not differentiable
            (like out=).
        backend: None (automatic, or the RANET_FAST_BACKEND environment variable), "cuda",
            "triton", "cpu" or "reference"; see ranet_fast._extension.
    """
    prologue_code, code = activation_code(prologue_activation, "prologue_activation"), activation_code(activation)
    negative_slope = _validate_negative_slope(negative_slope)
    height, width = _validate(x, weight, stride, padding, prologue_scale, prologue_shift, epilogue_scale,
                              epilogue_shift, out, out_offset)
    _validate_statistics(stats_sum, stats_sumsq, x, weight.shape[0])
    prologue_scale, prologue_shift = _as_accumulation(prologue_scale, x), _as_accumulation(prologue_shift, x)
    epilogue_scale, epilogue_shift = _as_accumulation(epilogue_scale, x), _as_accumulation(epilogue_shift, x)
    vectors = (prologue_scale, prologue_shift, epilogue_scale, epilogue_shift)
    activations = (prologue_code, code, negative_slope)
    if out is None and stats_sum is None:
        return run(SPEC, backend, x, weight, *vectors, stride, padding, *activations)
    form = "out=" if stats_sum is None else "statistics form (stats_sum=)"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, out, *vectors)):
        raise RuntimeError(
            f"fused_conv2d: the {form} is not differentiable, but an input or out requires grad; call it "
            "without out= and stats_sum= (or under torch.no_grad() if no gradient is needed)"
        )
    if out is None:
        out = _allocate_output(x, weight.shape[0], height, width)
    if stats_sum is None:
        run(SPEC, backend, out, x, weight, *vectors, stride, padding, *activations, out_offset, form=OUT)
    else:
        run(SPEC, backend, out, stats_sum, stats_sumsq, x, weight, *vectors, stride, padding, *activations, out_offset,
            form=STATS_OUT)
    return out
