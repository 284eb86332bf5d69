"""Shared definitions of the golden reference data (used by make_golden.py and by the tests).

The golden files were produced by the official RANet code (yangle15/RANet-pytorch) and the
official MSDNet code (kalviny/MSDNet-PyTorch), neither of which is part of this repository. They hold only what that code computed: state_dict layout, per-exit
logits in eval and train mode, BatchNorm running statistics and op_counter FLOPs. The weights and
inputs are not stored; they are regenerated here from fixed seeds, so a test rebuilds exactly the
same weights for its own model from the recorded key/shape list.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
from typing import Any, NamedTuple

import torch

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))



class OfficialFile(NamedTuple):
    """One official source file the golden data was produced from."""

    commit: str  # of its repository, where the file is at the path it is keyed by
    sha256: str  # of the file's bytes at that commit: the generator refuses a copy that differs


class Official(NamedTuple):
    """Where an architecture's official code comes from and what the generator loads of it."""

    repository: str
    model_class: str
    # Path in the repository -> the file; the model file first, then op_counter.py. The generator
    # reads each from --official-dir under its base name.
    sources: dict[str, OfficialFile]


OFFICIAL = {
    "RANet": Official("yangle15/RANet-pytorch", "RANet", {
        "models/RANet.py": OfficialFile("cbd1b43f5e0b2d9dd98afe56cdb75936955117a3",
                                        "913b458fd7334d83d8d02767de42107e7f47b825d9eb395139f786d1e3c5e399"),
        "op_counter.py": OfficialFile("dedd218ee2c9854a6b2020ec3de2e1da947a88f6",
                                      "b3d7163f5b774883e70c94faa685e2113fa66e8c6a8aaf108573e5bb7f03a6b2"),
    }),
    "MSDNet": Official("kalviny/MSDNet-PyTorch", "MSDNet", {
        "models/msdnet.py": OfficialFile("9a6386e3ae9fed4f48a11644a152124b0a49a6d5",
                                         "3b5a5f0c6ce651dd554ac4b7e7ebd96748687c047bdd60db4c0583c980a051d5"),
        "op_counter.py": OfficialFile("6c08a22672641ed4a7a2b3030318fb6c0782319c",
                                      "4a692e8122c1e3fc89e077a33b2cc2179e5d80c563667d1da7b1c0b589d3fb02"),
    }),
}


def sha256_of(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def check_official_copy(path: str, repository: str, source_path: str, source: OfficialFile) -> None:
    """Refuses a copy of an official file that is not the file at its recorded commit, byte for byte."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official file {path} not found (copy {source_path} of {repository} at "
                                f"commit {source.commit})")
    actual = sha256_of(path)
    if actual != source.sha256:
        raise ValueError(f"{path} has sha256 {actual}, but {source_path} of {repository} at commit {source.commit} "
                         f"has {source.sha256}: copy that file unmodified")


def recorded_sources(arch: str) -> dict[str, dict[str, str]]:
    """What a golden file records of the official sources it was produced from."""
    sources = OFFICIAL[arch].sources
    return {"official_sources": {path: file.commit for path, file in sources.items()},
            "official_source_sha256": {path: file.sha256 for path, file in sources.items()}}


WEIGHT_SEED = 20200314
INPUT_SEED = 7
# Seed before building a model whose own initialisation is compared (initial_weights.pt).
INIT_SEED = 0
INITIAL_WEIGHTS_PATH = os.path.join(GOLDEN_DIR, "initial_weights.pt")
# One initial-weights file per architecture (RANet's keeps its original name).
INITIAL_WEIGHTS_PATHS = {"RANet": INITIAL_WEIGHTS_PATH,
                         "MSDNet": os.path.join(GOLDEN_DIR, "msdnet_initial_weights.pt")}

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


def _config(base: dict[str, Any], /, **fields: Any) -> dict[str, Any]:
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

# MSDNet: the official args.py namespace after main.py's post-processing. The official constructor
# reads nBlocks, base, step, stepmode, nChannels, growthRate, grFactor, bnFactor, nScales, prune,
# bottleneck, reduction and data (the class count follows data); arch and num_classes are carried
# for ranet_fast (the official arch name is 'msdnet').
_MSDNET_CIFAR: dict[str, Any] = dict(
    arch="MSDNet", nBlocks=7, stepmode="even", step=2, base=4, nChannels=16, growthRate=6,
    grFactor=[1, 2, 4], bnFactor=[1, 2, 4], prune="max", bottleneck=True, reduction=0.5,
)

MSDNET_CONFIGS: dict[str, dict[str, Any]] = {
    # The official README's anytime-prediction command (block=7), on both CIFARs.
    "msdnet-cifar10": _config(_MSDNET_CIFAR, data="cifar10", num_classes=10),
    "msdnet-cifar100": _config(_MSDNET_CIFAR, data="cifar100", num_classes=100),
    # The README's budgeted-batch command (block=5): linearly growing blocks.
    "msdnet-cifar100-lin-grow": _config(_MSDNET_CIFAR, data="cifar100", num_classes=100, nBlocks=5,
                                        stepmode="lin_grow", step=1, base=1),
    # The README's ImageNet command (block=5, step=4), the pre-trained models' settings.
    "msdnet-imagenet": _config(_MSDNET_CIFAR, data="ImageNet", num_classes=1000, nBlocks=5, step=4,
                               nChannels=32, growthRate=16, grFactor=[1, 2, 4, 4], bnFactor=[1, 2, 4, 4]),
    # Not a README command: the other branches of the constructor (prune 'min' with its
    # transitions at one and two thirds, ConvBN without the bottleneck).
    "msdnet-cifar10-min-nobottleneck": _config(_MSDNET_CIFAR, data="cifar10", num_classes=10, nBlocks=3,
                                               base=2, prune="min", bottleneck=False),
}

# Every golden configuration, RANet's and MSDNet's.
ALL_CONFIGS: dict[str, dict[str, Any]] = {**CONFIGS, **MSDNET_CONFIGS}

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
    config = ALL_CONFIGS[name]
    return argparse.Namespace(**{k: list(v) if isinstance(v, list) else v for k, v in config.items()})


def image_size(name: str) -> int:
    return 224 if ALL_CONFIGS[name]["data"] == "ImageNet" else 32


def default_batch(name: str) -> int:
    return _BATCH["ImageNet" if ALL_CONFIGS[name]["data"] == "ImageNet" else "cifar"]


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


# Comparisons shared by the parity tests of every architecture.

def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def assert_eval_logits_match(model: torch.nn.Module, golden: dict[str, Any], x: torch.Tensor) -> None:
    """``model`` (holding the golden weights) in eval mode gives the official logits to 1e-5."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert len(logits) == golden["num_exits"]
    for exit_index, (ours, official) in enumerate(zip(logits, golden["eval_logits"])):
        assert ours.shape == official.shape
        assert relative_error(ours, official) < 1e-5, f"exit {exit_index}"


def assert_train_forward_matches(model: torch.nn.Module, golden: dict[str, Any], x: torch.Tensor) -> None:
    """One train-mode forward of ``model`` (holding the golden weights) gives the official logits
    and leaves the official BatchNorm running statistics."""
    model.train()
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model(x)
        exact = reference(x.double())
    assert len(logits) == golden["num_exits"]
    for exit_index, (ours, official, truth) in enumerate(zip(logits, golden["train_logits"], exact)):
        # Train-mode BN over the 2 to 4 golden images divides by tiny batch deviations, so the
        # fp32 rounding of ~50 layers grows past 1e-5 at the ImageNet exits (measured: 1.2e-5
        # between our fp32 and fp64 logits, 1.7e-5 between the official fp32 ones and our fp64
        # ones). The bound is 1e-5 or three times that measured fp32 noise, whichever is larger.
        noise = relative_error(ours.double(), truth)
        assert relative_error(ours, official) < max(1e-5, 3 * noise), f"exit {exit_index}"
    state = model.state_dict()
    assert golden["train_running_stats"], "golden file holds no running statistics"
    for key, official in golden["train_running_stats"].items():
        if official.dtype == torch.int64:
            assert torch.equal(state[key], official), key
        elif key.endswith("running_mean"):
            # A batch mean's rounding error scales with the spread of the values averaged, not with
            # the mean, which cancellation can make tiny (measured here: 1e-8 absolute on a mean of
            # 1e-3, whose fp32 summands are O(1)). The layer's running variance bounds that spread.
            spread = golden["train_running_stats"][key[:-len("mean")] + "var"].sqrt().max()
            scale = torch.maximum(official.abs().max(), spread)
            assert ((state[key] - official).abs().max() / scale).item() < 1e-5, key
        else:
            assert relative_error(state[key], official) < 1e-5, key


def golden_weights(golden: dict[str, Any]) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, torch.Tensor]]:
    """The recorded state_dict layout and the deterministic weights regenerated for it, checked
    against the recorded fingerprint."""
    layout = [(key, tuple(shape)) for key, shape in golden["keys_and_shapes"]]
    weights = deterministic_state_dict(layout, golden["weight_seed"])
    assert torch.equal(state_dict_fingerprint(weights, [k for k, _ in layout]), golden["weight_fingerprint"]), \
        "the deterministic weight generator changed; the golden data no longer applies"
    return layout, weights
