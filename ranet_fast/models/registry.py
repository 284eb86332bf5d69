"""One entry point per step for every architecture, chosen by ``args.arch`` (RANet when absent):
the official post-processing of the flags, their validation and the model itself."""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple

from torch import nn

from .configs import finish_args, validate_args
from .msdnet import MSDNet
from .msdnet_configs import finish_msdnet_args, validate_msdnet_args
from .ranet import RANet


class Architecture(NamedTuple):
    model: Callable[[argparse.Namespace], nn.Module]
    finish: Callable[[argparse.Namespace], argparse.Namespace]
    validate: Callable[[argparse.Namespace], None]


ARCHITECTURES: dict[str, Architecture] = {
    "RANet": Architecture(RANet, finish_args, validate_args),
    "MSDNet": Architecture(MSDNet, finish_msdnet_args, validate_msdnet_args),
}


def _architecture(args: argparse.Namespace) -> Architecture:
    arch = getattr(args, "arch", None) or "RANet"
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def finish_model_args(args: argparse.Namespace) -> argparse.Namespace:
    return _architecture(args).finish(args)


def validate_model_args(args: argparse.Namespace) -> None:
    _architecture(args).validate(args)


def build_model(args: argparse.Namespace) -> nn.Module:
    return _architecture(args).model(args)
