"""Batch normalisation in training mode, fused with ReLU: statistics, forward and backward kernels.

For x [N, C, H, W] and M = N * H * W values per channel:

* ``batch_norm_stats(x) -> (mean, var)``: per-channel mean and biased variance (divided by M);
* ``batch_norm_relu(x, mean, invstd, weight, bias, relu=True) -> y`` with
  ``y = act((x - mean[c]) * invstd[c] * weight[c] + bias[c])``, act = ReLU or the identity,
  optionally written into channels [out_offset, out_offset + C) of a bigger ``out``;
* ``batch_norm_relu_backward(grad_out, x, mean, invstd, weight, bias, relu=True)
  -> (grad_x, grad_weight, grad_bias)``: the gradient of ``act(batch_norm_train(x))`` when mean
  and invstd are x's own batch statistics (so the statistics' own gradient terms are included).
  With z the pre-activation, dz = grad_out * (z > 0) (just grad_out without ReLU),
  xhat = (x - mean) * invstd and sums over N, H, W: grad_bias = sum(dz),
  grad_weight = sum(dz * xhat), grad_x = weight * invstd * (dz - grad_bias / M - xhat * grad_weight / M).

They are the kernels of a layer's training-mode BN -> ReLU (the layer's autograd.Function calls
them and keeps the running statistics), so none of them is differentiable: each refuses inputs
that require grad while grad mode is on, instead of returning a result autograd cannot follow.

Everything is computed in the accumulation dtype (float32; float64 for float64 tensors): the
statistics and the parameter gradients are returned in it, y and grad_x are rounded to x's
dtype. All kernels compute z as ``(x - mean) * (invstd * weight) + bias`` (the reference too), so
the backward's ReLU mask is the forward's. x and grad_out may have any strides (channels_last,
a channel slice of a bigger buffer) and are read in place. Reductions are deterministic: fixed
partitions of the data, merged in a fixed order, no atomics. The statistics never subtract
E[x]^2 from E[x^2] (chunked two-pass sums merged with Chan's formula, or Welford), so a channel
whose mean is large against its spread keeps its variance.
"""

from __future__ import annotations

import functools

import torch

from ._checks import (require_channel_vector, require_int, require_no_overlap, require_out_channels,
                      require_out_like)
from ._registry import FUNCTIONAL, OUT, Form, OpSpec, register, run, triton_kernels
from .fused_conv2d import output_memory_format

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_MODULE = "batch_norm_relu"
VECTOR_NAMES = ("mean", "invstd", "weight", "bias")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in and return statistics and parameter gradients in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# Validation: everything the kernels assume, checked before a backend is chosen.
# ---------------------------------------------------------------------------


def _validate_input(op_name: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op_name} expects {name} as a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op_name} expects {name} of shape [N, C, H, W]; got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op_name} supports float16, bfloat16, float32 and float64 inputs; {name} has dtype {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{op_name} needs C >= 1; {name} has shape {tuple(x.shape)}")
    return x


def _validate_vectors(op_name: str, x: torch.Tensor, vectors: dict) -> None:
    for name, vector in vectors.items():
        require_channel_vector(op_name, name, vector, x.shape[1], x)


def _refuse_grad(op_name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op_name} is not differentiable, but an input requires grad; call it inside an "
            f"autograd.Function (as the layers do) or under torch.no_grad()"
        )


def _validate_stats(x: object) -> None:
    _validate_input("batch_norm_stats", "x", x)
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(
            f"batch_norm_stats needs at least 2 values per channel (N * H * W >= 2) to train BatchNorm; "
            f"x has shape {tuple(x.shape)}"
        )
    _refuse_grad("batch_norm_stats", x)


def _validate_forward(x, vectors: dict, out, out_offset) -> None:
    op_name = "batch_norm_relu"
    _validate_input(op_name, "x", x)
    _validate_vectors(op_name, x, vectors)
    if out is None:
        if require_int(op_name, "out_offset", out_offset) != 0:
            raise ValueError(f"{op_name}: out_offset ({out_offset}) needs out=")
    else:
        require_out_like(op_name, out, x, "[N, C_out, H, W]")
        if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"{op_name}: out has shape {tuple(out.shape)} but must be [{x.shape[0]}, C_out, {x.shape[2]}, "
                f"{x.shape[3]}] for x of shape {tuple(x.shape)}"
            )
        require_out_channels(op_name, out, out_offset, x.shape[1])
        require_no_overlap(op_name, "out", out.narrow(1, out_offset, x.shape[1]))
    _refuse_grad(op_name, x, *vectors.values(), out)


def _validate_backward(grad_out, x, vectors: dict) -> None:
    op_name = "batch_norm_relu_backward"
    _validate_input(op_name, "x", x)
    _validate_input(op_name, "grad_out", grad_out)
    if grad_out.shape != x.shape:
        raise ValueError(f"{op_name}: grad_out has shape {tuple(grad_out.shape)} but x has {tuple(x.shape)}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"{op_name}: grad_out has dtype {grad_out.dtype} but x has {x.dtype}")
    if grad_out.device != x.device:
        raise ValueError(f"{op_name}: grad_out is on {grad_out.device} but x is on {x.device}")
    _validate_vectors(op_name, x, vectors)
    _refuse_grad(op_name, grad_out, x, *vectors.values())


def _as_accumulation(x: torch.Tensor, vectors: dict) -> list[torch.Tensor]:
    dtype = accumulation_dtype(x.dtype)
    return [vectors[name].detach().to(dtype).contiguous() for name in VECTOR_NAMES]


# ---------------------------------------------------------------------------
# The reference: plain PyTorch in the accumulation dtype.
# ---------------------------------------------------------------------------


def _channel(vector: torch.Tensor) -> torch.Tensor:
    return vector.view(1, -1, 1, 1)


def batch_norm_stats_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x in the accumulation dtype (``torch.var_mean``)."""
    _validate_stats(x)
    var, mean = torch.var_mean(x.to(accumulation_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _pre_activation(x_acc, mean, invstd, weight, bias):
    return (x_acc - _channel(mean)) * _channel(invstd * weight) + _channel(bias)


def batch_norm_relu_reference(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    relu: bool = True,
    out: torch.Tensor | None = None,
    out_offset: int = 0,
) -> torch.Tensor:
    """act((x - mean) * (invstd * weight) + bias) in the accumulation dtype, rounded to x's dtype."""
    vectors = dict(mean=mean, invstd=invstd, weight=weight, bias=bias)
    _validate_forward(x, vectors, out, out_offset)
    mean, invstd, weight, bias = _as_accumulation(x, vectors)
    z = _pre_activation(x.to(mean.dtype), mean, invstd, weight, bias)
    y = (torch.relu(z) if relu else z).to(x.dtype)
    if out is None:
        return y.contiguous(memory_format=output_memory_format(x))
    out.narrow(1, out_offset, x.shape[1]).copy_(y)
    return out


def batch_norm_relu_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    relu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training-mode gradient of act(batch_norm(x)), by the module docstring's formula."""
    vectors = dict(mean=mean, invstd=invstd, weight=weight, bias=bias)
    _validate_backward(grad_out, x, vectors)
    mean, invstd, weight, bias = _as_accumulation(x, vectors)
    x_acc, grad = x.to(mean.dtype), grad_out.to(mean.dtype)
    if relu:
        z = _pre_activation(x_acc, mean, invstd, weight, bias)
        grad = torch.where(z > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    xhat = (x_acc - _channel(mean)) * _channel(invstd)
    grad_bias = grad.sum((0, 2, 3))
    grad_weight = (grad * xhat).sum((0, 2, 3))
    # With M == 0 the divisions give NaN vectors that only meet the empty grad tensor.
    count = x.shape[0] * x.shape[2] * x.shape[3]
    grad_x = _channel(invstd * weight) * (grad - _channel(grad_bias / count) - xhat * _channel(grad_weight / count))
    return grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x)), grad_weight, grad_bias


# ---------------------------------------------------------------------------
# The specs: fake implementations and Triton bodies (no autograd: not differentiable).
# ---------------------------------------------------------------------------


def _fake_stats(x):
    vector = x.new_empty(x.shape[1], dtype=accumulation_dtype(x.dtype))
    return vector, torch.empty_like(vector)


def _fake_forward(x, mean, invstd, weight, bias, relu):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _fake_forward_out(out, x, mean, invstd, weight, bias, relu, out_offset):
    return None


def _fake_backward(grad_out, x, mean, invstd, weight, bias, relu):
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    vector = x.new_empty(x.shape[1], dtype=accumulation_dtype(x.dtype))
    return grad_x, vector, torch.empty_like(vector)


# The Triton twins' bodies: allocate the outputs (as the fake functions say) and launch.


def _batch_norm_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = _fake_stats(x)
    triton_kernels(TRITON_MODULE).batch_norm_stats_triton(x, mean, var)
    return mean, var


def _batch_norm_relu_triton(
    x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool
) -> torch.Tensor:
    out = _fake_forward(x, mean, invstd, weight, bias, relu)
    triton_kernels(TRITON_MODULE).batch_norm_relu_triton(out, x, mean, invstd, weight, bias, relu)
    return out


def _batch_norm_relu_triton_out(
    out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    relu: bool,
    out_offset: int,
) -> None:
    triton_kernels(TRITON_MODULE).batch_norm_relu_triton(out.narrow(1, out_offset, x.shape[1]), x, mean, invstd,
                                                         weight, bias, relu)


def _batch_norm_relu_backward_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_weight, grad_bias = _fake_backward(grad_out, x, mean, invstd, weight, bias, relu)
    triton_kernels(TRITON_MODULE).batch_norm_relu_backward_triton(grad_x, grad_weight, grad_bias, grad_out, x, mean,
                                                                  invstd, weight, bias, relu)
    return grad_x, grad_weight, grad_bias


# The references with the compiled ops' arguments.


def _forward_reference_out(out, x, mean, invstd, weight, bias, relu, out_offset=0):
    """batch_norm_relu_reference; ``out=None`` is the functional form."""
    return batch_norm_relu_reference(x, mean, invstd, weight, bias, relu=relu, out=out, out_offset=out_offset)


def _backward_reference(grad_out, x, mean, invstd, weight, bias, relu):
    return batch_norm_relu_backward_reference(grad_out, x, mean, invstd, weight, bias, relu=relu)


STATS_SPEC = OpSpec("batch_norm_stats", TRITON_MODULE, {
    FUNCTIONAL: Form(triton=_batch_norm_stats_triton, reference=batch_norm_stats_reference, fake=_fake_stats),
})
FORWARD_SPEC = OpSpec("batch_norm_relu", TRITON_MODULE, {
    FUNCTIONAL: Form(triton=_batch_norm_relu_triton, reference=functools.partial(_forward_reference_out, None),
                     fake=_fake_forward),
    OUT: Form(triton=_batch_norm_relu_triton_out, reference=_forward_reference_out, fake=_fake_forward_out,
              mutates_args=("out",)),
})
BACKWARD_SPEC = OpSpec("batch_norm_relu_backward", TRITON_MODULE, {
    FUNCTIONAL: Form(triton=_batch_norm_relu_backward_triton, reference=_backward_reference, fake=_fake_backward),
})
register(STATS_SPEC)
register(FORWARD_SPEC)
register(BACKWARD_SPEC)


# ---------------------------------------------------------------------------
# The public ops.
# ---------------------------------------------------------------------------


def batch_norm_stats(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x over N, H and W (BatchNorm's batch statistics).

    Args:
        x: [N, C, H, W], float16/bfloat16/float32/float64, any strides (read in place), C >= 1 and
            N * H * W >= 2 (BatchNorm cannot train on fewer values per channel).
        backend: None (automatic, or the RANET_FAST_BACKEND environment variable), "cuda",
            "triton", "cpu" or "reference"; see ranet_fast._extension.

    Returns:
        (mean, var): [C] each, float32 (float64 for float64 x). Not differentiable.
    """
    _validate_stats(x)
    return run(STATS_SPEC, backend, x)


def batch_norm_relu(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    relu: bool = True,
    out: torch.Tensor | None = None,
    out_offset: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """``act((x - mean[c]) * invstd[c] * weight[c] + bias[c])``, optionally into a channel slice.

    Args:
        x: [N, C, H, W], float16/bfloat16/float32/float64, any strides; N >= 0.
        mean, invstd, weight, bias: [C] floating tensors on x's device, cast to the accumulation
            dtype (float32; float64 for float64 x).
        relu: apply ReLU (else the identity).
        out: None -> a new tensor in x's memory format (channels_last when x's channels are
            innermost). Otherwise a [N, C_out, H, W] tensor of x's dtype and device, any strides,
            of which only channels [out_offset, out_offset + C) are written; it is returned. The
            written channels must not overlap the memory x is read from.
        out_offset: first channel written in ``out``.
        backend: as for batch_norm_stats.

    Not differentiable (see the module docstring).
    """
    vectors = dict(mean=mean, invstd=invstd, weight=weight, bias=bias)
    _validate_forward(x, vectors, out, out_offset)
    mean, invstd, weight, bias = _as_accumulation(x, vectors)
    if out is None:
        return run(FORWARD_SPEC, backend, x, mean, invstd, weight, bias, relu)
    run(FORWARD_SPEC, backend, out, x, mean, invstd, weight, bias, relu, out_offset, form=OUT)
    return out


def batch_norm_relu_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    relu: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training-mode gradient of ``act(batch_norm(x))`` (formula in the module docstring).

    Args:
        grad_out: the gradient of y, x's shape, dtype and device, any strides (e.g. a channel
            slice of a bigger gradient buffer).
        x: the forward's input [N, C, H, W], any strides; N >= 0.
        mean, invstd: x's batch statistics (invstd = 1 / sqrt(var + eps)); weight, bias: the BN's
            affine parameters. [C] floating tensors on x's device, cast to the accumulation dtype.
        relu: whether the forward applied ReLU; its mask is recomputed from x.
        backend: as for batch_norm_stats.

    Returns:
        (grad_x, grad_weight, grad_bias): grad_x in x's dtype and memory format; the others [C] in
        the accumulation dtype (zeros when N * H * W == 0). Not differentiable.
    """
    vectors = dict(mean=mean, invstd=invstd, weight=weight, bias=bias)
    _validate_backward(grad_out, x, vectors)
    mean, invstd, weight, bias = _as_accumulation(x, vectors)
    return run(BACKWARD_SPEC, backend, grad_out, x, mean, invstd, weight, bias, relu)
