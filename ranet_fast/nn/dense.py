"""Conv -> BN -> ReLU layers and concat-free dense blocks of RANet on the ``fused_conv2d`` op.

Eval mode: BatchNorm in eval mode is an affine map per channel, so each conv -> BN -> ReLU
(the official ConvBasic and ConvBN with ``bnAfter``) is one ``fused_conv2d`` with the BN folded into
its epilogue, and BN -> ReLU -> conv (ConvBN without ``bnAfter``) one with the BN folded into its
prologue. A dense block allocates its [N, C_in + L * growth, H, W] output once, copies its input
into the first channels, and each layer's last conv writes its growth channels straight into the
buffer while reading the channel prefix before them in place: no torch.cat, and the per-layer
``outputs`` the next flow's fusion blocks reuse are prefix views of the one buffer.

Train mode: the same buffers through the autograd Functions of :mod:`ranet_fast.nn.train_mode`
(batch statistics, running-statistic updates as nn.BatchNorm2d, normalised activations recomputed
in backward); what that path does not cover (the pre-activation ConvBN, see
``train_mode.trainable``) runs the official computation (the parent class's forward).
An eval-mode forward that needs gradients (grad enabled and the input or a parameter requiring
grad) uses the differentiable functional op and concatenates (the in-place buffer writes are not
differentiable); a conv the op does not support runs eagerly. Under autocast the convs compute in
the autocast dtype and the folded BN stays float32 (:mod:`ranet_fast.nn.precision`).

The folded (scale, shift) of each BN is cached per layer and recomputed when any tensor it comes
from (BN weight, bias, running mean and variance, conv bias) is replaced, moved, or modified in
place (``_version``), after a train-mode BN forward (``num_batches_tracked``), or when the input's
dtype or device changes. Writes through ``tensor.data`` bypass version counters and are not seen:
modify parameters in place under ``torch.no_grad()`` instead (as optimizers and load_state_dict do).

The classes subclass the official-structure modules and change only ``forward``, so parameters,
buffers, state_dict keys and hooks stay exactly as they were; :func:`ranet_fast.convert` swaps them
in place.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ranet_fast.models.ranet import ConvBasic, ConvBN, ConvNormal, _BlockNormal
from ranet_fast.ops import fused_conv2d
from ranet_fast.ops.fused_conv2d import accumulation_dtype

from . import train_mode
from .common import buffer_like, conv_supported, official_forward_active, requires_grad, run_faster_path, tensor_of
from .precision import autocast_off, conv_dtype, conv_weight

_CACHE_ATTRIBUTE = "_ranet_fast_folded_bn"
def _bn_foldable(bn: nn.BatchNorm2d) -> bool:
    # Without running statistics BN normalises by batch statistics even in eval mode.
    return tensor_of(bn, "running_mean") is not None and tensor_of(bn, "running_var") is not None


def fold_batch_norm(bn: nn.BatchNorm2d, conv_bias: torch.Tensor | None, dtype: torch.dtype):
    """(scale, shift) with bn(conv + bias) = conv * scale + shift, in ``dtype``."""
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    mean = bn.running_mean.to(dtype)
    if conv_bias is not None:
        mean = mean - conv_bias.to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def folded_bn(owner: nn.Module, key: str, bn: nn.BatchNorm2d, conv_bias: torch.Tensor | None,
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN (after an optional conv bias) as (scale, shift) in x's accumulation dtype.

    Cached in ``owner`` under ``key``. The cache entry remembers the source tensors themselves
    (so a replaced tensor cannot alias an old one's address), their data pointers and version
    counters, eps, the dtype, the device and whether inference mode was on. It is bypassed when
    the result must carry gradients to the BN parameters, and under torch.compile, which traces
    the folding into the graph instead.
    """
    dtype = accumulation_dtype(x.dtype)
    parameters = tuple([t for t in (tensor_of(bn, "weight"), tensor_of(bn, "bias"), conv_bias) if t is not None])
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in parameters)):
        return fold_batch_norm(bn, conv_bias, dtype)
    # A train-mode BN forward updates the running statistics inside the batch-norm kernel without
    # bumping their version counters, but it also increments num_batches_tracked with add_, which does.
    sources = parameters + tuple([t for t in (tensor_of(bn, "running_mean"), tensor_of(bn, "running_var"),
                                              tensor_of(bn, "num_batches_tracked")) if t is not None])
    stamp = (
        tuple([(t.data_ptr(), t._version) for t in sources]), bn.eps, dtype, x.device, torch.is_inference_mode_enabled()
    )
    cache = owner.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    entry = cache.get(key)
    if entry is not None and entry[0] == stamp and all(a is b for a, b in zip(entry[1], sources)):
        return entry[2]
    with torch.no_grad():
        folded = tuple(t.to(x.device) for t in fold_batch_norm(bn, conv_bias, dtype))
    cache[key] = (stamp, sources, folded)
    return folded


def _conv_bn_relu(owner: nn.Module, key: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor,
                  out: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    x = x.to(conv_dtype(x, conv.weight))  # under autocast, the cast eager's conv makes
    scale, shift = folded_bn(owner, key, bn, conv.bias, x)
    with autocast_off(x):
        return fused_conv2d(x, conv_weight(conv, x.dtype), stride=conv.stride[0], padding=conv.padding[0],
                            epilogue_scale=scale, epilogue_shift=shift, activation="relu", out=out,
                            out_offset=offset)


def _fusable(module: nn.Module, convs: list[nn.Conv2d], bns: list[nn.BatchNorm2d], x: torch.Tensor) -> bool:
    return (
        not module.training
        and not official_forward_active()
        and all(_bn_foldable(bn) for bn in bns)
        and all(conv_supported(conv, x) for conv in convs)
    )


def conv_basic_fusable(module: ConvBasic, x: torch.Tensor) -> bool:
    return _fusable(module, [module.net[0]], [module.net[1]], x)


def conv_basic_eval(module: ConvBasic, x: torch.Tensor, out: torch.Tensor | None = None,
                    offset: int = 0) -> torch.Tensor:
    """The eval-mode ConvBasic (conv -> BN -> ReLU) as one fused_conv2d, optionally into out's channel slice."""
    return _conv_bn_relu(module, "net.1", module.net[0], module.net[1], x, out, offset)


def conv_bn_parts(module: ConvBN) -> tuple[bool, list[nn.Conv2d], list[nn.BatchNorm2d]]:
    """(bnAfter, [squeeze conv, spatial conv], BNs in order) of an official ConvBN."""
    net = module.net
    if isinstance(net[0], nn.BatchNorm2d):  # BN -> ReLU -> conv -> BN -> ReLU -> conv
        return False, [net[2], net[5]], [net[0], net[3]]
    return True, [net[0], net[3]], [net[1], net[4]]  # conv -> BN -> ReLU, twice


def conv_bn_fusable(module: ConvBN, x: torch.Tensor) -> bool:
    _, convs, bns = conv_bn_parts(module)
    return _fusable(module, convs, bns, x)


def conv_bn_eval(module: ConvBN, x: torch.Tensor, out: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """The eval-mode ConvBN as two fused_conv2d calls; the second may write into out's channel slice."""
    bn_after, (squeeze, spatial), bns = conv_bn_parts(module)
    if bn_after:
        hidden = _conv_bn_relu(module, "net.1", squeeze, bns[0], x)
        return _conv_bn_relu(module, "net.4", spatial, bns[1], hidden, out, offset)
    # Under autocast eager's BN -> ReLU runs on x as it is and the conv casts the activation; the
    # prologue computes in float32 and rounds to the conv's dtype, which is where that cast lands.
    x = x.to(conv_dtype(x, squeeze.weight))
    pre_scale, pre_shift = folded_bn(module, "net.0", bns[0], None, x)
    scale, shift = folded_bn(module, "net.3", bns[1], None, x)
    with autocast_off(x):
        hidden = fused_conv2d(x, conv_weight(squeeze, x.dtype), prologue_scale=pre_scale, prologue_shift=pre_shift,
                              epilogue_scale=scale, epilogue_shift=shift, activation="relu")
        return fused_conv2d(hidden, conv_weight(spatial, x.dtype), stride=spatial.stride[0],
                            padding=spatial.padding[0], out=out, out_offset=offset)


def conv_bn_into(module: ConvBN, x: torch.Tensor, out: torch.Tensor, offset: int) -> None:
    """Writes module(x) into out[:, offset : offset + C] (fused when possible; not differentiable).

    Fused only when out has the dtype the convs compute in: under autocast a float32 ``out`` (eager's
    ``cat`` of a float32 input with a low-precision conv output is float32) takes the eager layer.
    """
    if conv_bn_fusable(module, x) and out.dtype == conv_dtype(x, conv_bn_parts(module)[1][0].weight):
        conv_bn_eval(module, x, out, offset)
    else:
        result = module(x)
        out.narrow(1, offset, result.shape[1]).copy_(result)


def conv_basic_plan(module: ConvBasic) -> train_mode.ChainPlan:
    return train_mode.ChainPlan((module.net[0],), (module.net[1],))


def conv_bn_plan(module: ConvBN) -> train_mode.ChainPlan | None:
    """The train-mode chain of a ConvBN with ``bnAfter`` (None for the pre-activation order,
    which trains through the official forward)."""
    bn_after, convs, bns = conv_bn_parts(module)
    return train_mode.ChainPlan(tuple(convs), tuple(bns)) if bn_after else None


def _dense_layer_plans(layers) -> tuple[train_mode.ChainPlan, ...] | None:
    plans = tuple(conv_bn_plan(layer.conv_normal) for layer in layers)
    return None if any(plan is None for plan in plans) else plans


def _growth(layer: ConvNormal) -> int:
    return conv_bn_parts(layer.conv_normal)[1][1].out_channels


class FastConvBasic(ConvBasic):
    """``ConvBasic`` whose conv -> BN -> ReLU is one ``fused_conv2d`` in eval mode and a
    recomputing chain (``ranet_fast.nn.train_mode``) in train mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_faster_path(self, (x,), self._fused_path(x), functools.partial(super().forward, x))

    def _fused_path(self, x: torch.Tensor):
        if conv_basic_fusable(self, x):
            return functools.partial(conv_basic_eval, self, x)
        if self.training:
            plan = conv_basic_plan(self)
            if train_mode.trainable([plan], x):
                return functools.partial(train_mode.run_chain, plan, x)
        return None


class FastConvBN(ConvBN):
    """``ConvBN`` as two ``fused_conv2d`` calls in eval mode and a recomputing chain in train mode
    (``bnAfter``; the pre-activation order trains through the official forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_faster_path(self, (x,), self._fused_path(x), functools.partial(super().forward, x))

    def _fused_path(self, x: torch.Tensor):
        if conv_bn_fusable(self, x):
            return functools.partial(conv_bn_eval, self, x)
        if self.training:
            plan = conv_bn_plan(self)
            if plan is not None and train_mode.trainable([plan], x):
                return functools.partial(train_mode.run_chain, plan, x)
        return None


class FastConvNormal(ConvNormal):
    """``ConvNormal`` (``cat([x, conv_normal(x)])``) that allocates its output once, copies x in
    and lets ``conv_normal`` write its channels in place, in eval and train mode."""

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(x, list):  # the official layer also accepts a one-element list
            x = x[0]
        return run_faster_path(self, (x,), self._fused_path(x), functools.partial(super().forward, x))

    def _fused_path(self, x: torch.Tensor):
        if self.training:
            plans = _dense_layer_plans([self])
            if plans is not None and train_mode.trainable(list(plans), x, concatenates_input=True):
                return lambda: train_mode.run_dense_layers(plans, x)[0]
            return None
        if official_forward_active() or requires_grad(x, self):
            return None
        return functools.partial(self._eval_in_place, x)

    def _eval_in_place(self, x: torch.Tensor) -> torch.Tensor:
        out = buffer_like(x, x.shape[1] + _growth(self))
        out[:, : x.shape[1]].copy_(x)
        conv_bn_into(self.conv_normal, x, out, x.shape[1])
        return out


class FastBlockNormal(_BlockNormal):
    """Dense block without torch.cat, in eval and train mode.

    One [N, C_in + L * growth, H, W] buffer in x's memory format; layer i reads the prefix
    ``buffer[:, :C_i]`` in place and writes its growth channels after it; ``outputs`` are prefix
    views of the buffer. Train mode: ``ranet_fast.nn.train_mode.DenseBlockFunction``.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return run_faster_path(self, (x,), self._fused_path(x), functools.partial(super().forward, x))

    def _fused_path(self, x: torch.Tensor):
        if self.training:
            plans = _dense_layer_plans(self.layers)
            if plans is None or not train_mode.trainable(list(plans), x, concatenates_input=True):
                return None
            return functools.partial(self._in_buffer, x, plans)
        if official_forward_active() or requires_grad(x, self):
            return None
        return functools.partial(self._in_buffer, x, None)

    def _in_buffer(self, x: torch.Tensor, plans) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block with every layer writing into one buffer: train mode through ``plans``' autograd
        Function, eval mode (``plans`` None) directly."""
        if plans is not None:
            buffer, outputs = train_mode.run_dense_layers(plans, x)
        else:
            channels = x.shape[1]
            buffer = buffer_like(x, channels + sum(_growth(layer) for layer in self.layers))
            buffer[:, :channels].copy_(x)
            outputs = [x]
            for layer in self.layers:
                conv_bn_into(layer.conv_normal, buffer[:, :channels], buffer, channels)
                channels += _growth(layer)
                outputs.append(buffer[:, :channels])
        x = buffer
        if self.trans_flag:
            x = self.trans(x)
        return x, outputs
