"""ranet_fast: fast, official-compatible Resolution Adaptive Networks and multi-exit CNNs."""

__version__ = "0.1.0"

from .flops import count_flops
from .models import MSDNet, RANet, msdnet_config, ranet_config
from .nn import convert

__all__ = ["MSDNet", "RANet", "convert", "count_flops", "msdnet_config", "ranet_config", "__version__"]
