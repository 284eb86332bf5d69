"""Train-mode conv -> BN -> ReLU chains, dense blocks and fusion layers without torch.cat.

Eager training keeps, for every dense layer, its concatenated input (a new, growing copy of the
block's features) and every BN's normalised activation for backward. Here:

* A *chain* is one or more conv -> BN (batch statistics) -> ReLU units: the official ConvBasic
  (one unit) or the bottleneck ConvBN with ``bnAfter`` (two). Forward, per unit:
  ``y = fused_conv2d(source)``, ``batch_norm_stats(y)``, the running-statistic update of
  ``nn.BatchNorm2d``; a unit's BN -> ReLU is applied by the next conv as its prologue, on load, so
  that activation is never written, and only the last unit's ``batch_norm_relu`` writes its
  activation, straight into the caller's channel slice.
* Saved for backward: each conv's pre-BN output ``y`` and the batch statistics; the chain input
  is a prefix of a buffer the block keeps anyway. Backward recomputes each intermediate activation
  from its ``y`` (``batch_norm_relu``), then runs ``aten.convolution_backward`` and
  ``batch_norm_relu_backward`` (the training-mode BN gradient, ReLU mask recomputed).
* A dense block allocates [N, C_in + L * growth, H, W] once; layer i reads the prefix
  ``buffer[:, :C_i]`` in place and writes its growth channels after it. One autograd Function
  covers the whole block and returns the buffer together with the prefix views the next flow's
  fusion blocks reuse, so each view gets its own gradient (no full-size zero gradients per view)
  and backward accumulates every layer's input gradient into the prefix of one gradient buffer.
* A fusion layer allocates its output once: the conv branch writes its slice through the chain,
  ``upsample_concat(out=)`` resizes the two other parts into theirs.

Everything else (running statistics, gradients of input, conv weights and BN affine parameters)
equals eager's. Double backward is not supported. A layer uses this path in train mode when
every conv is one ``fused_conv2d`` computes exactly, every BN is affine with running statistics
and sees more than one value per channel, and neither ``official_forward()`` nor ``torch.compile``
tracing is active (torch.compile then traces the official computation). Under ``torch.autocast``
the convs compute in the autocast dtype and the BN statistics and running buffers stay float32,
eager autocast's policy (see :mod:`ranet_fast.nn.precision`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ranet_fast.ops import batch_norm_relu, batch_norm_relu_backward, batch_norm_stats, fused_conv2d, upsample_concat
from ranet_fast.ops.fused_conv2d import accumulation_dtype
from ranet_fast.ops.fused_conv2d import output_size as conv_output_size
from ranet_fast.ops.upsample_concat import upsample_concat_backward

from .common import buffer_like, conv_supported, official_forward_active
from .precision import autocast_off, conv_dtype, conv_weight

# Tensors per chain unit in the flat parameter list: conv weight, conv bias, BN weight, BN bias.
_PER_UNIT = 4
# Tensors per chain unit in the saved list: pre-BN conv output, batch mean, batch 1/std.
_SAVED_PER_UNIT = 3


@dataclass(frozen=True, eq=False)
class ChainPlan:
    """The conv -> BN -> ReLU units of one chain, in order."""

    convs: tuple[nn.Conv2d, ...]
    bns: tuple[nn.BatchNorm2d, ...]

    @property
    def out_channels(self) -> int:
        return self.convs[-1].out_channels

    @property
    def num_parameters(self) -> int:
        return _PER_UNIT * len(self.convs)

    @property
    def num_saved(self) -> int:
        return _SAVED_PER_UNIT * len(self.convs)

    def parameters(self) -> list[torch.Tensor | None]:
        return [t for conv, bn in zip(self.convs, self.bns) for t in (conv.weight, conv.bias, bn.weight, bn.bias)]

    def unit_output_sizes(self, size: tuple[int, int]) -> list[tuple[int, int]]:
        """The spatial size after each conv for an input of ``size``."""
        sizes = []
        for conv in self.convs:
            size = tuple(conv_output_size(s, conv.kernel_size[0], conv.stride[0], conv.padding[0]) for s in size)
            sizes.append(size)
        return sizes

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.unit_output_sizes(size)[-1]


def trainable(plans: list[ChainPlan], x: torch.Tensor, *, concatenates_input: bool = False) -> bool:
    """Whether the chains can run on x through this module (else the layer runs its official forward).

    Every chain reads x's spatial size; the chains of a dense block keep it (stride 1), which
    ``plans`` of a block satisfy by construction. A layer that writes its chains' output next to x
    in one buffer (``concatenates_input``) needs x in the dtype the convs compute in: under autocast
    a float32 x would make eager's ``cat`` float32 around low-precision conv outputs.
    """
    if official_forward_active() or torch.compiler.is_compiling():
        return False
    if x.dim() != 4 or x.shape[0] == 0:
        return False
    if concatenates_input and x.dtype != conv_dtype(x, plans[0].convs[0].weight):
        return False
    for plan in plans:
        for conv, bn, size in zip(plan.convs, plan.bns, plan.unit_output_sizes(tuple(x.shape[2:]))):
            if not conv_supported(conv, x):
                return False
            if not (bn.training and bn.affine and bn.track_running_stats and bn.running_mean is not None):
                return False
            # Eager BatchNorm refuses one value per channel in training; let it say so.
            if x.shape[0] * size[0] * size[1] <= 1:
                return False
    return True


def _update_running_statistics(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """The update nn.BatchNorm2d makes in a train-mode forward (momentum None: cumulative average)."""
    with torch.no_grad():
        factor = bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if factor is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        unbiased = var * (count / (count - 1))
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _unit(params, index):
    return params[_PER_UNIT * index:_PER_UNIT * (index + 1)]


def _saved_unit(saved, index):
    return saved[_SAVED_PER_UNIT * index:_SAVED_PER_UNIT * (index + 1)]


def chain_forward(plan: ChainPlan, params, x: torch.Tensor, out: torch.Tensor, offset: int) -> list[torch.Tensor]:
    """Runs the chain on x, writes its activation into ``out[:, offset : offset + C]`` and updates
    the BN running statistics; returns what backward needs (per unit: y, mean, invstd).

    The convs compute in x's dtype (the callers cast x to the autocast dtype under autocast) on
    weights cast to it (``precision.conv_weight``); statistics, running buffers and the BN
    vectors stay float32, as eager autocast keeps them."""
    saved: list[torch.Tensor] = []
    source, prologue_scale, prologue_shift = x, None, None
    last = len(plan.convs) - 1
    for index, (conv, bn) in enumerate(zip(plan.convs, plan.bns)):
        _, bias, gamma, beta = _unit(params, index)
        y = fused_conv2d(source, conv_weight(conv, x.dtype), stride=conv.stride[0], padding=conv.padding[0],
                         prologue_scale=prologue_scale, prologue_shift=prologue_shift, epilogue_shift=bias)
        mean, var = batch_norm_stats(y)
        invstd = torch.rsqrt(var + bn.eps)
        _update_running_statistics(bn, mean, var, y.numel() // y.shape[1])
        saved += [y, mean, invstd]
        if index == last:
            batch_norm_relu(y, mean, invstd, gamma, beta, out=out, out_offset=offset)
        else:
            prologue_scale = gamma.to(invstd.dtype) * invstd
            prologue_shift = beta.to(invstd.dtype) - mean * prologue_scale
            source = y
    return saved


def chain_backward(plan: ChainPlan, params, x: torch.Tensor, saved, grad: torch.Tensor, needs_x: bool,
                   needs_params) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of the chain's input and parameters from the gradient of its activation."""
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    for index in reversed(range(len(plan.convs))):
        conv = plan.convs[index]
        weight, bias, gamma, beta = _unit(params, index)
        y, mean, invstd = _saved_unit(saved, index)
        grad_y, grad_gamma, grad_beta = batch_norm_relu_backward(grad, y, mean, invstd, gamma, beta)
        if index == 0:
            source = x
        else:  # recompute the activation the forward applied on load and never stored
            previous_y, previous_mean, previous_invstd = _saved_unit(saved, index - 1)
            _, _, previous_gamma, previous_beta = _unit(params, index - 1)
            source = batch_norm_relu(previous_y, previous_mean, previous_invstd, previous_gamma, previous_beta)
        needs = needs_params[_PER_UNIT * index:_PER_UNIT * (index + 1)]
        # The conv ran on the weight in y's dtype (the cached cast: the weight has not changed since
        # forward); its gradients go back to the parameters' dtype, as through eager autocast's cast.
        grad_source, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_y, source, conv_weight(conv, y.dtype), None if bias is None else [bias.shape[0]],
            list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0], 1,
            [index > 0 or needs_x, needs[0], bias is not None and needs[1]])
        param_grads[_PER_UNIT * index:_PER_UNIT * (index + 1)] = [
            grad_weight.to(weight.dtype) if needs[0] else None,
            grad_bias.to(bias.dtype) if bias is not None and needs[1] else None,
            grad_gamma.to(gamma.dtype) if needs[2] else None, grad_beta.to(beta.dtype) if needs[3] else None]
        grad = grad_source
    return grad, param_grads


class ChainFunction(torch.autograd.Function):
    """A conv -> BN -> ReLU chain into a new tensor."""

    @staticmethod
    def forward(ctx, x, plan: ChainPlan, *params):
        out = buffer_like(x, plan.out_channels, plan.output_size(tuple(x.shape[2:])))
        with autocast_off(x):
            saved = chain_forward(plan, params, x, out, 0)
        ctx.plan = plan
        ctx.save_for_backward(x, *params, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, *rest = ctx.saved_tensors
        params, saved = rest[:ctx.plan.num_parameters], rest[ctx.plan.num_parameters:]
        grad_x, param_grads = chain_backward(ctx.plan, params, x, saved, grad_out, ctx.needs_input_grad[0],
                                             ctx.needs_input_grad[2:])
        return grad_x, None, *param_grads


def run_chain(plan: ChainPlan, x: torch.Tensor) -> torch.Tensor:
    # Under autocast, the (differentiable) cast of the input eager's first conv makes.
    x = x.to(conv_dtype(x, plan.convs[0].weight))
    return ChainFunction.apply(x, plan, *plan.parameters())


def _layer_ranges(plans: tuple[ChainPlan, ...]) -> list[tuple[slice, slice]]:
    """Per layer, its slices of the block's flat parameter list and of its saved-tensor list."""
    ranges, parameter_start, saved_start = [], 0, 0
    for plan in plans:
        ranges.append((slice(parameter_start, parameter_start + plan.num_parameters),
                       slice(saved_start, saved_start + plan.num_saved)))
        parameter_start += plan.num_parameters
        saved_start += plan.num_saved
    return ranges


class DenseBlockFunction(torch.autograd.Function):
    """Dense layers (each ``cat([x, chain(x)])``) into one buffer.

    Returns the buffer and its prefix views after layers 1 .. L-1 (the buffer itself is the view
    after layer L).
    """

    @staticmethod
    def forward(ctx, x, plans: tuple[ChainPlan, ...], *params):
        in_channels = x.shape[1]
        prefixes = [in_channels]
        for plan in plans:
            prefixes.append(prefixes[-1] + plan.out_channels)
        buffer = buffer_like(x, prefixes[-1])
        buffer[:, :in_channels].copy_(x)
        saved: list[torch.Tensor] = []
        with autocast_off(x):
            for plan, channels, (parameter_range, _) in zip(plans, prefixes, _layer_ranges(plans)):
                saved += chain_forward(plan, params[parameter_range], buffer[:, :channels], buffer, channels)
        ctx.plans, ctx.prefixes = plans, prefixes
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(buffer, *params, *saved)
        return (buffer, *(buffer[:, :channels] for channels in prefixes[1:-1]))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_buffer, *grad_prefixes):
        buffer, *rest = ctx.saved_tensors
        num_params = sum(plan.num_parameters for plan in ctx.plans)
        params, saved = rest[:num_params], rest[num_params:]
        prefixes = ctx.prefixes
        # One gradient buffer of our own (the incoming one may be shared), every prefix view's
        # gradient added into its channels.
        grad = torch.zeros_like(buffer) if grad_buffer is None else grad_buffer.clone()
        for channels, grad_prefix in zip(prefixes[1:-1], grad_prefixes):
            if grad_prefix is not None:
                grad[:, :channels] += grad_prefix
        param_grads: list[torch.Tensor | None] = [None] * num_params
        needs_params = ctx.needs_input_grad[2:]
        ranges = _layer_ranges(ctx.plans)
        for layer in reversed(range(len(ctx.plans))):
            plan, channels, (parameter_range, saved_range) = ctx.plans[layer], prefixes[layer], ranges[layer]
            grad_prefix, grads = chain_backward(
                plan, params[parameter_range], buffer[:, :channels], saved[saved_range],
                grad[:, channels:channels + plan.out_channels], layer > 0 or ctx.needs_input_grad[0],
                needs_params[parameter_range])
            param_grads[parameter_range] = grads
            if grad_prefix is not None:
                grad[:, :channels] += grad_prefix
        grad_x = grad[:, :prefixes[0]] if ctx.needs_input_grad[0] else None
        return grad_x, None, *param_grads


def run_dense_layers(plans: tuple[ChainPlan, ...], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(buffer, [x, after layer 1, ..., after layer L]) for dense layers on x."""
    params = [t for plan in plans for t in plan.parameters()]
    buffer, *prefix_views = DenseBlockFunction.apply(x, plans, *params)
    return buffer, [x, *prefix_views, buffer]


class FusionLayerFunction(torch.autograd.Function):
    """A RANet fusion layer's ``cat([resize(x), resize(up), chain(x)])`` into one buffer."""

    @staticmethod
    def forward(ctx, x, up, plan: ChainPlan, *params):
        size = plan.output_size(tuple(x.shape[2:]))
        offset = x.shape[1] + up.shape[1]
        out = buffer_like(x, offset + plan.out_channels, size)
        with autocast_off(x):
            saved = chain_forward(plan, params, x, out, offset)
            upsample_concat([x, up], size, channel_offsets=[0, x.shape[1]], out=out)
        ctx.plan = plan
        ctx.part_shapes = [tuple(x.shape[1:]), tuple(up.shape[1:])]
        ctx.save_for_backward(x, *params, *saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, *rest = ctx.saved_tensors
        params, saved = rest[:ctx.plan.num_parameters], rest[ctx.plan.num_parameters:]
        offset = sum(shape[0] for shape in ctx.part_shapes)
        grad_x_chain, param_grads = chain_backward(
            ctx.plan, params, x, saved, grad_out[:, offset:], ctx.needs_input_grad[0], ctx.needs_input_grad[3:])
        grad_x, grad_up = upsample_concat_backward(grad_out, ctx.part_shapes, [0, ctx.part_shapes[0][0]])
        if grad_x_chain is not None:
            grad_x += grad_x_chain
        return (grad_x if ctx.needs_input_grad[0] else None), (grad_up if ctx.needs_input_grad[1] else None), \
            None, *param_grads


def run_fusion_layer(plan: ChainPlan, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return FusionLayerFunction.apply(x, up, plan, *plan.parameters())
