"""Operators of ranet_fast with compiled, Triton and pure-PyTorch backends."""

from .batch_norm_relu import (batch_norm_relu, batch_norm_relu_backward, batch_norm_relu_backward_reference,
                              batch_norm_relu_reference, batch_norm_stats, batch_norm_stats_reference)
from .exit_confidence import exit_confidence, exit_confidence_reference
from .exit_partition import (exit_partition, exit_partition_reference, exit_partition_scatter,
                             exit_partition_scatter_reference)
from .fused_conv2d import fused_conv2d, fused_conv2d_reference
from .gather_rows import gather_rows, gather_rows_reference
from .scatter_exits import scatter_exits, scatter_exits_reference
from .upsample_concat import upsample_concat, upsample_concat_reference

__all__ = [
    "batch_norm_relu",
    "batch_norm_relu_backward",
    "batch_norm_relu_backward_reference",
    "batch_norm_relu_reference",
    "batch_norm_stats",
    "batch_norm_stats_reference",
    "exit_confidence",
    "exit_confidence_reference",
    "exit_partition",
    "exit_partition_reference",
    "exit_partition_scatter",
    "exit_partition_scatter_reference",
    "fused_conv2d",
    "fused_conv2d_reference",
    "gather_rows",
    "gather_rows_reference",
    "scatter_exits",
    "scatter_exits_reference",
    "upsample_concat",
    "upsample_concat_reference",
]
