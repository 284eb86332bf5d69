"""Triton kernels of ranet_fast, shipped as ``ranet_fast.kernels``.

Each module holds a kernel next to the Python function that launches it.
Importing this package imports Triton. Triton fixes at kernel definition time
whether kernels are compiled for the GPU or run by its interpreter
(``TRITON_INTERPRET=1``, which also accepts CPU tensors); ``INTERPRETED`` records
which mode this import got.
"""

from .exit_confidence import INTERPRETED, exit_confidence_triton
from .exit_partition import exit_partition_triton
from .scatter_exits import scatter_exits_triton

__all__ = ["INTERPRETED", "exit_confidence_triton", "exit_partition_triton", "scatter_exits_triton"]
