"""``ranet_fast.convert``: swap fast layers into a model built from the official module classes."""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from ranet_fast.models.ranet import ConvBasic, ConvBN, ConvNormal, ConvUpNormal, _BlockNormal, _BlockUpNormal

from .dense import FastBlockNormal, FastConvBasic, FastConvBN, FastConvNormal
from .fusion import FastBlockUpNormal, FastConvUpNormal

# Official class -> fast subclass. A fast class only overrides forward, so a module is converted
# by changing its class: parameters, buffers, state_dict keys and hooks stay as they are.
# The dense layers fuse only in eval mode and run the official forward in train mode.
FAST_CLASSES: dict[type, type] = {
    ConvBasic: FastConvBasic,
    ConvBN: FastConvBN,
    ConvNormal: FastConvNormal,
    _BlockNormal: FastBlockNormal,
    ConvUpNormal: FastConvUpNormal,
    _BlockUpNormal: FastBlockUpNormal,
}


def convert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replace, in place, every module whose class has a fast counterpart; return ``model``.

    Only exact class matches are converted (a user subclass may change forward in ways the fast
    layer would not honour). The counts of converted classes are kept in
    ``model.ranet_fast_converted`` and printed when ``verbose``.
    """
    converted: Counter[str] = Counter()
    for module in model.modules():
        fast = FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
            converted[fast.__name__] += 1
    model.ranet_fast_converted = dict(converted)
    if verbose:
        summary = ", ".join(f"{count} x {name}" for name, count in sorted(converted.items())) or "nothing"
        print(f"ranet_fast.convert: converted {summary}")
    return model
