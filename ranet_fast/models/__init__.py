"""Models: RANet and MSDNet with the official module trees, and their paper configurations."""

from .configs import PAPER_CONFIGS, finish_args, parse_factor_list, ranet_config, validate_args
from .msdnet import MSDNet
from .msdnet_configs import (MSDNET_CONFIGS, MSDNET_DEFAULTS, finish_msdnet_args, msdnet_config, plan_msdnet,
                             validate_msdnet_args)
from .ranet import RANet, plan_blocks
from .registry import ARCHITECTURES, build_model, finish_model_args, validate_model_args

__all__ = ["ARCHITECTURES", "MSDNET_CONFIGS", "MSDNET_DEFAULTS", "MSDNet", "PAPER_CONFIGS", "RANet",
           "build_model", "finish_args", "finish_model_args", "finish_msdnet_args", "msdnet_config",
           "parse_factor_list", "plan_blocks", "plan_msdnet", "ranet_config", "validate_args",
           "validate_model_args", "validate_msdnet_args"]
