"""Shared definitions of the golden reference data (used by make_golden.py and by the tests).

The golden files were produced by the official RANet code (yangle15/RANet-pytorch), which is not
part of this repository. They hold only what that code computed: state_dict layout, per-exit
logits in eval and train mode, BatchNorm running statistics and op_counter FLOPs. The weights and
inputs are not stored; they are regenerated here from fixed seeds, so a test rebuilds exactly the
same weights for its own model from the recorded key/shape list.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

import torch

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))

WEIGHT_SEED = 20200314
INPUT_SEED = 7
# Seed before building a model whose own initialisation is compared (initial_weights.pt).
INIT_SEED = 0
INITIAL_WEIGHTS_PATH = os.path.join(GOLDEN_DIR, "initial_weights.pt")

# Value every num_batches_tracked buffer is set to, so the train-mode update (7 -> 8) is visible.
NUM_BATCHES_TRACKED = 7

# Official argparse fields (after args.py's post-processing) of each golden configuration.
# The official constructor reads: data, scale_list, grFactor, bnFactor, nScales (RAFirstLayer
# only), step, stepmode, nBlocks, block_step, nChannels, growthRate, compress_factor, reduction.
# bnAfter, num_classes and arch are carried for completeness: the official model ignores them
# (every dense layer passes bottleneck=True; the class count follows args.data).
_CIFAR_DEFAULTS: dict[str, Any] = dict(
    nBlocks=2, block_step=2, compress_factor=0.25, reduction=0.5, bnAfter=True, arch="RANet",
    nChannels=16, growthRate=6, step=4, stepmode="even",
)
_IMAGENET_DEFAULTS: dict[str, Any] = dict(
    _CIFAR_DEFAULTS, data="ImageNet", num_classes=1000, scale_list=[1, 2, 3, 4],
    grFactor=[4, 2, 2, 1], bnFactor=[4, 2, 2, 1], step=8, growthRate=16,
)


def _config(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    config = dict(base, **fields)
    config["nScales"] = len(config["grFactor"])
    return config


CONFIGS: dict[str, dict[str, Any]] = {
    "cifar-c1": _config(_CIFAR_DEFAULTS, data="cifar10", num_classes=10, scale_list=[1, 2, 3],
                        grFactor=[4, 2, 1], bnFactor=[4, 2, 1]),
    "cifar-c2": _config(_CIFAR_DEFAULTS, data="cifar10", num_classes=10, scale_list=[1, 2, 2, 3],
                        grFactor=[4, 2, 2, 1], bnFactor=[4, 2, 2, 1]),
    "cifar-c3": _config(_CIFAR_DEFAULTS, data="cifar10", num_classes=10, scale_list=[1, 2, 3, 3],
                        grFactor=[4, 2, 1, 1], bnFactor=[4, 2, 1, 1]),
    # The official README's example command: two layers per block, growing linearly ('lg').
    "cifar-c1-lg": _config(_CIFAR_DEFAULTS, data="cifar10", num_classes=10, scale_list=[1, 2, 3],
                           grFactor=[4, 2, 1], bnFactor=[4, 2, 1], step=2, stepmode="lg"),
    "cifar100-c3": _config(_CIFAR_DEFAULTS, data="cifar100", num_classes=100,
                           scale_list=[1, 2, 3, 3], grFactor=[4, 2, 1, 1], bnFactor=[4, 2, 1, 1]),
    "imagenet-1": _config(_IMAGENET_DEFAULTS, nChannels=32),
    "imagenet-2": _config(_IMAGENET_DEFAULTS, nChannels=64),
}

# Per-exit FLOPs (millions) and total parameters (millions) that the official op_counter gave,
# as listed in shared/ranet-notes.md (rounded there).
NOTES_MFLOPS = {
    "cifar-c1": [13.44, 28.91, 42.28, 47.98, 58.28, 61.27],
    "cifar-c2": [15.8, 31.3, 44.6, 50.4, 88.8, 98.1, 127.4, 132.1],
    "cifar-c3": [15.8, 31.3, 44.7, 50.4, 60.7, 63.6, 90.2, 94.9],
    "imagenet-1": [246.5, 631.2, 860.4, 1041.1, 1869.8, 2160.4, 2734.3, 2828.3],
}
NOTES_MPARAMS = {"cifar-c1": 2.45, "cifar-c3": 3.26}

# Batch size of the golden input per data set family.
_BATCH = {"cifar": 4, "ImageNet": 2}


def make_args(name: str) -> argparse.Namespace:
    """A fresh namespace for configuration ``name`` (fresh lists: the constructor mutates args)."""
    config = CONFIGS[name]
    return argparse.Namespace(**{k: list(v) if isinstance(v, list) else v for k, v in config.items()})


def image_size(name: str) -> int:
    return 224 if CONFIGS[name]["data"] == "ImageNet" else 32


def default_batch(name: str) -> int:
    return _BATCH["ImageNet" if CONFIGS[name]["data"] == "ImageNet" else "cifar"]


def golden_input(name: str, batch: int | None = None, seed: int = INPUT_SEED) -> torch.Tensor:
    """The float32 input the golden logits were computed on: standard normal, NCHW."""
    if batch is None:
        batch = default_batch(name)
    size = image_size(name)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float32)


def _module_prefix(key: str) -> str:
    return key.rsplit(".", 1)[0]


def deterministic_state_dict(shapes: dict[str, tuple[int, ...]] | list, seed: int = WEIGHT_SEED
                             ) -> dict[str, torch.Tensor]:
    """Reproducible, non-degenerate values for every state_dict entry.

    ``shapes`` maps key -> shape (a list of [key, shape] pairs is accepted too). Values are drawn
    from one generator in sorted key order, so the result depends only on the keys and shapes,
    not on the order a model lists them. Scales keep activations O(1) through the deep net:
    conv weights ~ N(0, 2/fan_in) (He), linear weights ~ N(0, 1/fan_in), BatchNorm affine and
    running statistics around (1, 0) with visible spread, other biases ~ N(0, 0.1^2).
    """
    shapes = {key: tuple(int(d) for d in shape) for key, shape in dict(shapes).items()}
    batchnorm_modules = {_module_prefix(k) for k in shapes if k.endswith(".running_mean")}
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std

    def uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float32)

    state: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        leaf = key.rsplit(".", 1)[-1]
        is_batchnorm = _module_prefix(key) in batchnorm_modules
        if leaf == "num_batches_tracked":
            value = torch.tensor(NUM_BATCHES_TRACKED, dtype=torch.int64)
        elif is_batchnorm and leaf in ("weight", "running_var"):
            value = uniform(shape, 0.5, 1.5)
        elif is_batchnorm and leaf in ("bias", "running_mean"):
            value = normal(shape, 0.1)
        elif leaf == "weight" and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            value = normal(shape, math.sqrt(2.0 / fan_in))
        elif leaf == "weight" and len(shape) == 2:
            value = normal(shape, math.sqrt(1.0 / shape[1]))
        elif leaf == "bias" and len(shape) == 1:
            value = normal(shape, 0.1)
        else:
            raise ValueError(f"no deterministic value rule for state_dict entry {key!r} of shape {shape}")
        state[key] = value
    return state


def state_dict_fingerprint(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    """[len(keys), 2] float64 (sum, sum of squares) per entry: detects a change in the generator."""
    rows = [[state[k].double().sum().item(), state[k].double().square().sum().item()] for k in keys]
    return torch.tensor(rows, dtype=torch.float64)


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{name}.pt")


def load_golden(name: str) -> dict[str, Any]:
    """The recorded reference data of configuration ``name`` (see README.md for the fields)."""
    return torch.load(golden_path(name), map_location="cpu", weights_only=True)
