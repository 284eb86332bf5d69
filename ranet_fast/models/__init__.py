"""Models: RANet with the official module tree, and its paper configurations."""

from .configs import PAPER_CONFIGS, finish_args, parse_factor_list, ranet_config, validate_args
from .ranet import RANet, plan_blocks

__all__ = ["PAPER_CONFIGS", "RANet", "finish_args", "parse_factor_list", "plan_blocks",
           "ranet_config", "validate_args"]
