"""ranet_fast: fast, official-compatible Resolution Adaptive Networks and multi-exit CNNs."""

__version__ = "0.1.0"

from .flops import count_flops
from .models import RANet, ranet_config

__all__ = ["RANet", "count_flops", "ranet_config", "__version__"]
