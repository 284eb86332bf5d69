"""Fast drop-in layers: subclasses of the official-structure modules with fused forwards."""

from .convert import convert
from .exits import EarlyExitBackbone, attach_exits
from .dense import FastBlockNormal, FastConvBasic, FastConvBN, FastConvNormal
from .fusion import FastBlockUpNormal, FastConvUpNormal

__all__ = [
    "FastBlockNormal",
    "FastBlockUpNormal",
    "FastConvBN",
    "FastConvBasic",
    "FastConvNormal",
    "FastConvUpNormal",
    "EarlyExitBackbone",
    "attach_exits",
    "convert",
]
