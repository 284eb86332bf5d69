"""Fast drop-in layers: subclasses of the official-structure modules with fused forwards."""

from .convert import convert
from .fusion import FastBlockUpNormal, FastConvUpNormal

__all__ = ["FastBlockUpNormal", "FastConvUpNormal", "convert"]
