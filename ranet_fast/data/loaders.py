"""Data loaders with the official RANet split semantics.

``get_dataloaders(args)`` follows the official ``dataloader.py``:

* cifar10 / cifar100: torchvision CIFAR; training images get RandomCrop(32, padding=4)
  and RandomHorizontalFlip, every image ToTensor and the official per-channel
  normalisation. ImageNet: ImageFolder over ``<data_root>/train`` and ``<data_root>/val``
  with RandomResizedCrop(224) + flip for training, Resize(256) + CenterCrop(224) for
  evaluation. synthetic: ``SyntheticShapes`` (generator seed 0 whatever ``args.seed``,
  so the data set is the same for every run) with the CIFAR transforms and its own
  normalisation (``synthetic.MEAN``/``STD``, measured on the default training split).
* Without ``--use-valid`` the validation loader *is* the test loader (the official
  test set: CIFAR test batch, ImageNet val/, the synthetic 'test' split).
* With ``--use-valid`` a random permutation of the training set is drawn once and saved
  as ``<save>/index.pth`` (reloaded on later runs, so resumed runs and evaluations see
  the same split); its last 5000 (CIFAR) or 50000 (ImageNet) indices form the
  validation set, the rest the training set, and the test loader reads the official
  test set. The synthetic data set has a generated 'val' split of its own instead.

Deliberate differences from the official code:

* The carved-out validation images use the evaluation transform; the official loader
  reads them through the training set and so augments them (random crop and flip),
  which makes the fitted exit thresholds random.
* Validation and test loaders iterate in a fixed order (the official validation
  loader shuffles; no metric depends on the order).
* The permutation in index.pth comes from a generator seeded with ``args.seed`` and is
  written atomically; an existing file is checked to be a permutation of the training
  set.
* Shuffling is reproducible for exact resume: the training sampler and the loader
  (whose generator seeds the worker processes) own ``torch.Generator`` objects, seeded
  from ``(args.seed, 0)`` at construction. Call ``set_epoch(loader, epoch, seed)`` (or
  re-seed ``loader.sampler.generator`` and ``loader.generator`` yourself, as
  ``ranet_fast.train`` does) before each epoch, and epoch ``e``'s order depends only
  on ``(seed, e)``. With ``args.distributed`` the training loader uses a
  ``DistributedSampler(shuffle=True, seed=args.seed)``, whose ``set_epoch`` the same
  helper calls; validation and test are not sharded.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchvision import datasets, transforms

from ranet_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ranet_fast.models.configs import DATA_SETS, IMAGE_SIZES, NUM_CLASSES

from . import synthetic
NORMALISATION = {  # (mean, std) per channel
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": (synthetic.MEAN, synthetic.STD),
}
# Size of the validation set carved from the training set with --use-valid (official).
CARVED_VALIDATION_SIZE = {"cifar10": 5000, "cifar100": 5000, "ImageNet": 50000}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class DatasetNotFoundError(FileNotFoundError):
    """The requested data set is not where ``--data-root`` says, or is incomplete."""


def _check_data_name(args) -> str:
    name = getattr(args, "data", None)
    if name not in DATA_SETS:
        raise ValueError(f"unknown data set {name!r} (--data); expected one of {', '.join(DATA_SETS)}")
    return name


def image_size(args) -> int:
    """Input resolution: 32 for cifar10/cifar100/synthetic, 224 for ImageNet."""
    return IMAGE_SIZES[_check_data_name(args)]


def num_classes_for(args) -> int:
    """Classes of ``args.data``: cifar10 10, cifar100 100, ImageNet 1000, synthetic 10.

    ``args.num_classes`` (when set) may only change the synthetic data set's count (a model
    with more outputs than the 10 classes is allowed there); for the real data sets a
    different value is an error.
    """
    name = _check_data_name(args)
    requested = getattr(args, "num_classes", None)
    if requested is None:
        return NUM_CLASSES[name]
    if name == "synthetic":
        if requested < synthetic.NUM_CLASSES:
            raise ValueError(f"--num-classes {requested} is smaller than the synthetic data set's "
                             f"{synthetic.NUM_CLASSES} classes")
        return requested
    if requested != NUM_CLASSES[name]:
        raise ValueError(f"--num-classes {requested} does not match --data {name}, "
                         f"which has {NUM_CLASSES[name]} classes")
    return requested


def _transforms(name: str) -> tuple[Callable, Callable]:
    """(training transform, evaluation transform) of data set ``name``."""
    mean, std = NORMALISATION[name]
    normalize = transforms.Normalize(mean=mean, std=std)
    if name == "ImageNet":
        train = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        evaluation = [transforms.Resize(256), transforms.CenterCrop(224)]
    else:
        train = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        evaluation = []
    tail = [transforms.ToTensor(), normalize]
    return transforms.Compose(train + tail), transforms.Compose(evaluation + tail)


class TransformedSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image (all of ``base`` if no indices).

    Lets the training and the carved-out validation set share one loaded data set while
    using different transforms.
    """

    def __init__(self, base: Dataset, transform: Callable, indices: Sequence[int] | None = None):
        self.base = base
        self.transform = transform
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int):
        if self.indices is not None:
            index = int(self.indices[index])
        image, target = self.base[index]
        return self.transform(image), target


def _cifar_loader(name: str, root: str, download: bool) -> Callable[[bool], Dataset]:
    """Checks that CIFAR is present (or may be downloaded); returns ``load(train: bool)``."""
    folder = os.path.join(root, CIFAR_FOLDERS[name])
    if not download and not os.path.isdir(folder):
        raise DatasetNotFoundError(
            f"{name} not found: expected the directory '{folder}'; pass --download to fetch it, "
            f"or point --data-root at a directory holding {CIFAR_FOLDERS[name]}")
    cifar = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    def load(train: bool) -> Dataset:
        try:
            return cifar(root, train=train, download=download)
        except RuntimeError as error:  # torchvision's md5 check failed: files missing or corrupt
            raise DatasetNotFoundError(
                f"{name} in '{folder}' is incomplete or corrupt ({error}). Delete it and pass "
                f"--download to fetch it again, or point --data-root at a directory holding a "
                f"complete {CIFAR_FOLDERS[name]}") from error

    return load


def _imagenet_loader(root: str) -> Callable[[bool], Dataset]:
    """Checks that ``root`` holds train/ and val/; returns ``load(train: bool)``."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    missing = [d for d in (train_dir, val_dir) if not os.path.isdir(d)]
    if missing:
        raise DatasetNotFoundError(
            f"ImageNet not found: missing {' and '.join(repr(d) for d in missing)}. --data-root must "
            f"hold train/ and val/, each with one sub-directory of images per class (ImageFolder "
            f"layout); ImageNet cannot be downloaded automatically")
    return lambda train: datasets.ImageFolder(train_dir if train else val_dir)


def _synthetic_sizes(args) -> tuple[int, int, int]:
    sizes = getattr(args, "synthetic_size", None)
    if sizes is None:
        return tuple(synthetic.DEFAULT_SIZES[split] for split in synthetic.SPLITS)
    if len(sizes) != 3 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"--synthetic-size needs three positive sizes TRAIN,VAL,TEST, got {sizes!r}")
    return tuple(int(s) for s in sizes)


def split_permutation(num_train: int, save_dir: str, seed: int) -> torch.Tensor:
    """The --use-valid permutation of the training set, stored in ``<save_dir>/index.pth``.

    Loaded when the file exists (it must be a permutation of ``range(num_train)``),
    otherwise drawn from a generator seeded with ``seed`` and written atomically.
    """
    path = os.path.join(save_dir, "index.pth")
    if os.path.exists(path):
        try:
            index = load_checkpoint(path)
        except CheckpointError as error:
            raise ValueError(f"cannot read the saved train/validation split: {error}") from error
        if (not isinstance(index, torch.Tensor) or index.dim() != 1 or index.numel() != num_train
                or index.is_floating_point()
                or not torch.equal(index.sort().values, torch.arange(num_train, dtype=index.dtype))):
            raise ValueError(
                f"'{path}' does not hold a permutation of the {num_train} training images; it was "
                f"written for a different data set. Use another --save directory or delete the file")
        return index.to(torch.int64)
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(num_train, generator=generator)
    save_checkpoint(index, path)
    return index


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, stream)."""
    state = np.random.SeedSequence([int(seed), int(epoch), stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


_SAMPLER_STREAM, _WORKER_STREAM = 0, 1


def set_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Make ``loader``'s shuffling order and worker seeds for ``epoch`` depend only on (seed, epoch).

    Call before iterating over the epoch. Handles the training loaders of
    ``get_dataloaders`` (sampler with a generator, or DistributedSampler); loaders without
    randomness are left alone.
    """
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif getattr(sampler, "generator", None) is not None:
        sampler.generator.manual_seed(_epoch_seed(seed, epoch, _SAMPLER_STREAM))
    if loader.generator is not None:
        loader.generator.manual_seed(_epoch_seed(seed, epoch, _WORKER_STREAM))


def _loader(dataset: Dataset, args, train: bool) -> DataLoader:
    common = dict(batch_size=args.batch_size, num_workers=args.workers,
                  pin_memory=torch.cuda.is_available())
    if not train:
        return DataLoader(dataset, shuffle=False, **common)
    seed = int(getattr(args, "seed", 0))
    if getattr(args, "distributed", False):
        sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    loader = DataLoader(dataset, sampler=sampler, generator=torch.Generator(), **common)
    set_epoch(loader, 0, seed)
    return loader


def get_dataloaders(args) -> tuple[DataLoader | None, DataLoader | None, DataLoader | None]:
    """(train_loader, val_loader, test_loader) with the official split semantics.

    Reads args.data, data_root, use_valid, splits (default ['train', 'val', 'test'] with
    use_valid, else ['train', 'val']), batch_size, workers, save (index.pth with
    use_valid), seed, and optionally download, distributed and synthetic_size
    (TRAIN, VAL, TEST). A loader whose split is not requested is None and its data is not
    loaded; without use_valid the validation and test loaders are the same object (built
    when 'val' or 'test' is requested).
    """
    name = _check_data_name(args)
    use_valid = bool(args.use_valid)
    splits = getattr(args, "splits", None)
    if splits is None:
        splits = ["train", "val", "test"] if use_valid else ["train", "val"]
    # Only the data sets behind requested loaders are built.
    need_train = "train" in splits
    need_val = use_valid and "val" in splits
    need_test = "test" in splits if use_valid else ("val" in splits or "test" in splits)
    train_transform, eval_transform = _transforms(name)
    train_set = val_set = test_set = None

    if name == "synthetic":
        # The data set itself is fixed (generator seed 0) whatever the training seed, like CIFAR.
        train_size, val_size, test_size = _synthetic_sizes(args)
        if need_train:
            train_set = synthetic.SyntheticShapes("train", train_size, transform=train_transform)
        if need_val:
            val_set = synthetic.SyntheticShapes("val", val_size, transform=eval_transform)
        if need_test:
            test_set = synthetic.SyntheticShapes("test", test_size, transform=eval_transform)
    else:
        root = os.fspath(args.data_root)
        if name == "ImageNet":
            load = _imagenet_loader(root)
        else:
            load = _cifar_loader(name, root, bool(getattr(args, "download", False)))
        if need_test:
            test_set = TransformedSubset(load(False), eval_transform)
        if use_valid and (need_train or need_val):
            train_base = load(True)
            num_valid = CARVED_VALIDATION_SIZE[name]
            if len(train_base) <= num_valid:
                raise ValueError(f"--use-valid carves {num_valid} validation images out of the training "
                                 f"set, but {name} in '{root}' has only {len(train_base)}")
            index = split_permutation(len(train_base), args.save, getattr(args, "seed", 0))
            train_set = TransformedSubset(train_base, train_transform, index[:-num_valid])
            val_set = TransformedSubset(train_base, eval_transform, index[-num_valid:])
        elif need_train:
            train_set = TransformedSubset(load(True), train_transform)

    train_loader = _loader(train_set, args, train=True) if need_train else None
    test_loader = _loader(test_set, args, train=False) if need_test else None
    if use_valid:
        val_loader = _loader(val_set, args, train=False) if need_val else None
    else:
        val_loader = test_loader
    return train_loader, val_loader, test_loader
