"""ranet_fast: fast, official-compatible Resolution Adaptive Networks and multi-exit CNNs."""

__version__ = "0.1.0"

from .flops import count_flops
from .models import RANet, ranet_config
from .nn import convert

__all__ = ["RANet", "convert", "count_flops", "ranet_config", "__version__"]
