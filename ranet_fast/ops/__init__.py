"""Operators of ranet_fast with compiled, Triton and pure-PyTorch backends."""

from .exit_confidence import exit_confidence, exit_confidence_reference
from .gather_rows import gather_rows, gather_rows_reference
from .upsample_concat import upsample_concat, upsample_concat_reference

__all__ = [
    "exit_confidence",
    "exit_confidence_reference",
    "gather_rows",
    "gather_rows_reference",
    "upsample_concat",
    "upsample_concat_reference",
]
