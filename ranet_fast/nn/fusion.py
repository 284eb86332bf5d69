"""Fusion layers of RANet on the fused ``upsample_concat`` op.

The official fusion layer resizes the current features and the coarser flow's features with one
``F.interpolate`` each (an identity copy when the size already matches) and concatenates them with
the conv branch: three copies of the data plus a fourth in ``torch.cat``. Here one
``upsample_concat`` launch resizes or copies every part straight into its channel slice. Under autocast the parts are
in the autocast dtype (conv outputs); a part outside it takes the official forward, whose ``cat``
promotes.

The classes subclass the official-structure modules and change only ``forward``, so parameters,
buffers, state_dict keys and hooks stay exactly as they were; :func:`ranet_fast.convert` swaps them
in place.
"""

from __future__ import annotations

import functools

import torch

from ranet_fast.models.ranet import ConvUpNormal, _BlockUpNormal
from ranet_fast.ops import upsample_concat
from ranet_fast.ops.fused_conv2d import output_size as conv_output_size

from .common import buffer_like, official_forward_active, requires_grad, run_faster_path
from .precision import outside_autocast_dtype
from . import train_mode
from .dense import conv_bn_into, conv_bn_parts, conv_bn_plan


class FastConvUpNormal(ConvUpNormal):
    """``ConvUpNormal`` whose resize-and-concatenate is one ``upsample_concat``.

    The layer's output is allocated once: ``conv_normal``'s last conv writes ``res`` straight into
    its channel slice and ``upsample_concat(out=...)`` writes the two resized parts into theirs, so
    nothing is copied into place afterwards; in eval mode without gradients directly, in train
    mode through ``ranet_fast.nn.train_mode.FusionLayerFunction``.
    """

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        x_low, x_cur = x
        return run_faster_path(self, (x_low, x_cur), self._fused_path(x_low, x_cur),
                               functools.partial(super().forward, x))

    def _fused_path(self, x_low: torch.Tensor, x_cur: torch.Tensor):
        # The official forward, whose submodule calls hooks see; or under autocast an input that
        # eager's cat would promote.
        if official_forward_active() or outside_autocast_dtype(x_cur):
            return None
        if self.training:
            plan = conv_bn_plan(self.conv_normal)
            if plan is not None and train_mode.trainable([plan], x_cur, concatenates_input=True):
                return lambda: train_mode.run_fusion_layer(plan, x_cur, self.conv_up(x_low))
        if self.training or requires_grad(x_low, self) or x_cur.requires_grad:
            return functools.partial(self._differentiable, x_low, x_cur)
        return functools.partial(self._eval_in_place, x_low, x_cur)

    def _differentiable(self, x_low: torch.Tensor, x_cur: torch.Tensor) -> torch.Tensor:
        """The branches as they are, then one differentiable ``upsample_concat``."""
        res = self.conv_normal(x_cur)
        return upsample_concat([x_cur, self.conv_up(x_low), res], tuple(res.shape[-2:]))

    def _eval_in_place(self, x_low: torch.Tensor, x_cur: torch.Tensor) -> torch.Tensor:
        spatial = conv_bn_parts(self.conv_normal)[1][1]
        size = tuple(conv_output_size(s, spatial.kernel_size[0], spatial.stride[0], spatial.padding[0])
                     for s in x_cur.shape[-2:])
        up = self.conv_up(x_low)
        channels = x_cur.shape[1]
        out = buffer_like(x_cur, channels + up.shape[1] + spatial.out_channels, size)
        conv_bn_into(self.conv_normal, x_cur, out, channels + up.shape[1])
        return upsample_concat([x_cur, up], size, channel_offsets=[0, channels], out=out)


class FastBlockUpNormal(_BlockUpNormal):
    """``_BlockUpNormal`` whose closing resize-and-concatenate is one ``upsample_concat``.

    Its layers are converted separately (they are :class:`FastConvUpNormal` after
    :func:`ranet_fast.convert`).
    """

    def forward(self, x: torch.Tensor, low_feat: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fused = (None if official_forward_active() or outside_autocast_dtype(x)
                 else functools.partial(self._with_upsample_concat, x, low_feat))
        return run_faster_path(self, (x, *low_feat), fused, functools.partial(super().forward, x, low_feat))

    def _with_upsample_concat(self, x: torch.Tensor, low_feat: list[torch.Tensor]):
        outputs = [x]
        for i, layer in enumerate(self.layers):
            x = layer([low_feat[i], x])
            outputs.append(x)
        x = upsample_concat([x, self.conv_last(low_feat[self.num_layers])], tuple(x.shape[-2:]))
        if self.trans_flag:
            x = self.trans(x)
        return x, outputs
