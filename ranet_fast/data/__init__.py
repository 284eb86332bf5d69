"""Data sets and loaders: CIFAR-10/100 and ImageNet with the official RANet splits and
transforms, and ``SyntheticShapes``, a generated data set in which resolution matters."""

from .loaders import (
    DatasetNotFoundError,
    TransformedSubset,
    get_dataloaders,
    image_size,
    num_classes_for,
    set_epoch,
    split_permutation,
)
from .synthetic import SyntheticShapes, save_preview

__all__ = [
    "DatasetNotFoundError",
    "SyntheticShapes",
    "TransformedSubset",
    "get_dataloaders",
    "image_size",
    "num_classes_for",
    "save_preview",
    "set_epoch",
    "split_permutation",
]
