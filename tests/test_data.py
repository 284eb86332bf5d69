"""Data loaders: official split semantics, transforms, reproducible shuffling, clear errors."""
import argparse
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ranet_fast.data import (
    DatasetNotFoundError,
    SyntheticShapes,
    get_dataloaders,
    image_size,
    num_classes_for,
    set_epoch,
    split_permutation,
)
from ranet_fast.data import loaders, synthetic


def make_args(tmp_path, **overrides):
    values = dict(data="synthetic", data_root=str(tmp_path / "data"), use_valid=False, batch_size=8,
                  workers=0, save=str(tmp_path / "save"), seed=0, synthetic_size=(48, 16, 24))
    values.update(overrides)
    return argparse.Namespace(**values)


def normalised(images_hwc_uint8, data):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in loaders.NORMALISATION[data])
    x = torch.from_numpy(np.array(images_hwc_uint8)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


# ----------------------------------------------------------------------------------------
# Sizes and class counts.
# ----------------------------------------------------------------------------------------
def test_image_size_and_num_classes():
    ns = argparse.Namespace
    assert [image_size(ns(data=d)) for d in ("cifar10", "cifar100", "ImageNet", "synthetic")] == [32, 32, 224, 32]
    assert [num_classes_for(ns(data=d)) for d in ("cifar10", "cifar100", "ImageNet", "synthetic")] == [10, 100, 1000, 10]
    assert num_classes_for(ns(data="cifar100", num_classes=None)) == 100
    assert num_classes_for(ns(data="synthetic", num_classes=12)) == 12
    with pytest.raises(ValueError, match="--num-classes 100 does not match --data cifar10"):
        num_classes_for(ns(data="cifar10", num_classes=100))
    with pytest.raises(ValueError, match="smaller than the synthetic data set's 10 classes"):
        num_classes_for(ns(data="synthetic", num_classes=5))
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        image_size(ns(data="mnist"))


# ----------------------------------------------------------------------------------------
# Synthetic data: both split modes.
# ----------------------------------------------------------------------------------------
def test_synthetic_without_use_valid_validates_on_the_test_split(tmp_path):
    train, val, test = get_dataloaders(make_args(tmp_path))
    assert val is test  # official: without --use-valid the test set doubles as validation
    assert len(train.dataset) == 48 and len(test.dataset) == 24
    assert train.dataset.split == "train" and test.dataset.split == "test"
    images, labels = next(iter(train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    # The test loader reads the test split in order, normalised, unaugmented.
    images, labels = next(iter(test))
    reference = SyntheticShapes("test", 24)
    assert torch.allclose(images, normalised(reference.data[:8], "synthetic"), atol=1e-6)
    assert labels.tolist() == reference.targets[:8]
    assert not os.path.exists(os.path.join(tmp_path, "save", "index.pth"))


def test_synthetic_with_use_valid_has_its_own_validation_split(tmp_path):
    args = make_args(tmp_path, use_valid=True)
    train, val, test = get_dataloaders(args)
    assert val is not test
    assert (len(train.dataset), len(val.dataset), len(test.dataset)) == (48, 16, 24)
    assert val.dataset.split == "val" and test.dataset.split == "test"
    images, _ = next(iter(val))
    assert torch.allclose(images, normalised(SyntheticShapes("val", 16).data[:8], "synthetic"), atol=1e-6)


def test_requested_splits_only(tmp_path):
    train, val, test = get_dataloaders(make_args(tmp_path, splits=["val"]))
    assert train is None and val is test and val is not None
    train, val, test = get_dataloaders(make_args(tmp_path, use_valid=True, splits=["train", "test"]))
    assert train is not None and val is None and test is not None
    train, val, test = get_dataloaders(make_args(tmp_path, splits=["train"]))
    assert train is not None and val is None and test is None


def test_default_synthetic_sizes_and_training_seed_does_not_change_the_data(tmp_path):
    args = make_args(tmp_path, splits=["val"], seed=5)
    del args.synthetic_size
    _, val, _ = get_dataloaders(args)
    assert len(val.dataset) == synthetic.DEFAULT_SIZES["test"]
    assert np.array_equal(val.dataset.data[:50], SyntheticShapes("test", 50, seed=0).data)


def test_training_augmentation_crops_and_flips(tmp_path):
    train, _, _ = get_dataloaders(make_args(tmp_path))
    torch.manual_seed(0)
    dataset = train.dataset
    plain = normalised(dataset.data[:1], "synthetic")[0]
    views = [dataset[0][0] for _ in range(20)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.allclose(v, plain) for v in views)


# ----------------------------------------------------------------------------------------
# Reproducible shuffling.
# ----------------------------------------------------------------------------------------
def epoch_order(loader):
    return [int(i) for i in loader.sampler]


def test_epoch_order_depends_only_on_seed_and_epoch(tmp_path):
    first, _, _ = get_dataloaders(make_args(tmp_path, seed=3))
    orders = []
    for epoch in range(3):
        set_epoch(first, epoch, 3)
        orders.append(epoch_order(first))
    assert sorted(orders[0]) == list(range(48))
    assert orders[0] != orders[1] != orders[2]
    # A fresh loader (e.g. after resuming) jumping straight to epoch 2 sees the same order.
    resumed, _, _ = get_dataloaders(make_args(tmp_path, seed=3))
    set_epoch(resumed, 2, 3)
    assert epoch_order(resumed) == orders[2]
    # The worker seeds follow the epoch too.
    set_epoch(first, 1, 3)
    set_epoch(resumed, 1, 3)
    assert first.generator.initial_seed() == resumed.generator.initial_seed()
    set_epoch(resumed, 2, 3)
    assert first.generator.initial_seed() != resumed.generator.initial_seed()
    # A new loader starts at epoch 0 without a set_epoch call.
    fresh, _, _ = get_dataloaders(make_args(tmp_path, seed=3))
    assert epoch_order(fresh) == orders[0]
    other_seed, _, _ = get_dataloaders(make_args(tmp_path, seed=4))
    assert epoch_order(other_seed) != orders[0]


def test_distributed_training_sampler(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train, _, test = get_dataloaders(make_args(tmp_path, distributed=True, seed=2))
        assert isinstance(train.sampler, torch.utils.data.DistributedSampler)
        assert train.sampler.seed == 2 and train.sampler.shuffle
        set_epoch(train, 1, 2)
        assert train.sampler.epoch == 1
        assert sorted(epoch_order(train)) == list(range(48))
        assert isinstance(test.sampler, torch.utils.data.SequentialSampler)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# The --use-valid permutation file.
# ----------------------------------------------------------------------------------------
def test_split_permutation_is_saved_atomically_and_reloaded(tmp_path):
    save = tmp_path / "run"
    index = split_permutation(100, str(save), seed=1)
    assert sorted(index.tolist()) == list(range(100))
    assert os.listdir(save) == ["index.pth"]  # no temporary file left behind
    assert torch.equal(torch.load(save / "index.pth", weights_only=True), index)
    # An existing file wins over the seed (official: reload on later runs).
    assert torch.equal(split_permutation(100, str(save), seed=2), index)
    assert not torch.equal(split_permutation(100, str(tmp_path / "other"), seed=2), index)
    with pytest.raises(ValueError, match="does not hold a permutation of the 50 training images"):
        split_permutation(50, str(save), seed=1)
    (save / "index.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="index.pth"):
        split_permutation(100, str(save), seed=1)


# ----------------------------------------------------------------------------------------
# CIFAR and ImageNet: missing data, and the real code path on tiny fake copies.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_names_the_path_and_the_fix(tmp_path, data, folder):
    with pytest.raises(DatasetNotFoundError) as caught:
        get_dataloaders(make_args(tmp_path, data=data))
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert os.path.join(str(tmp_path / "data"), folder) in message
    assert "pass --download to fetch it, or point --data-root at a directory holding " + folder in message


def test_missing_imagenet_names_train_and_val(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as caught:
        get_dataloaders(make_args(tmp_path, data="ImageNet"))
    message = str(caught.value)
    assert f"missing '{tmp_path / 'data' / 'val'}'" in message
    assert f"'{tmp_path / 'data' / 'train'}'" not in message  # train/ exists
    assert "train/ and val/" in message


def write_fake_cifar10(root, train_per_batch, num_test, seed=0):
    """torchvision's CIFAR10 on-disk format: pickled dicts of uint8 rows (3072 = 3x32x32)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)

    def dump(name, obj):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(obj, f)

    for i in range(1, 6):
        dump(f"data_batch_{i}", {"data": rng.integers(0, 256, (train_per_batch, 3072), dtype=np.uint8),
                                 "labels": rng.integers(0, 10, train_per_batch).tolist()})
    dump("test_batch", {"data": rng.integers(0, 256, (num_test, 3072), dtype=np.uint8),
                        "labels": rng.integers(0, 10, num_test).tolist()})
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    # The fake files cannot match torchvision's md5 sums; accept any file that exists.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_corrupt_cifar_is_reported(tmp_path):
    write_fake_cifar10(str(tmp_path / "data"), 2, 2)  # real md5 check: fails
    with pytest.raises(DatasetNotFoundError, match="incomplete or corrupt"):
        get_dataloaders(make_args(tmp_path, data="cifar10"))


def test_fake_cifar10_without_use_valid(tmp_path, skip_cifar_md5):
    write_fake_cifar10(str(tmp_path / "data"), 4, 6)
    train, val, test = get_dataloaders(make_args(tmp_path, data="cifar10"))
    assert val is test and len(train.dataset) == 20 and len(test.dataset) == 6
    images, labels = next(iter(test))
    raw = torchvision.datasets.CIFAR10(str(tmp_path / "data"), train=False)
    assert torch.allclose(images, normalised(raw.data[:6], "cifar10"), atol=1e-6)
    assert labels.tolist() == raw.targets[:6]
    images, _ = next(iter(train))
    assert images.shape == (8, 3, 32, 32)


def test_fake_cifar10_with_use_valid_carves_5000_from_train(tmp_path, skip_cifar_md5):
    write_fake_cifar10(str(tmp_path / "data"), 1004, 6)  # 5020 training images
    args = make_args(tmp_path, data="cifar10", use_valid=True, batch_size=500)
    train, val, test = get_dataloaders(args)
    index = torch.load(os.path.join(args.save, "index.pth"), weights_only=True)
    assert sorted(index.tolist()) == list(range(5020))
    assert len(train.dataset) == 20 and len(val.dataset) == 5000 and len(test.dataset) == 6
    assert train.dataset.indices.tolist() == index[:-5000].tolist()
    assert val.dataset.indices.tolist() == index[-5000:].tolist()
    # Validation images come from the training set, in index order, with the evaluation
    # transform (no augmentation).
    raw = torchvision.datasets.CIFAR10(str(tmp_path / "data"), train=True)
    images, labels = next(iter(val))
    chosen = index[-5000:][:500].numpy()
    assert torch.allclose(images, normalised(raw.data[chosen], "cifar10"), atol=1e-6)
    assert labels.tolist() == [raw.targets[i] for i in chosen]
    # A second run reuses the saved split even with another seed.
    again, val_again, _ = get_dataloaders(make_args(tmp_path, data="cifar10", use_valid=True, seed=9))
    assert val_again.dataset.indices.tolist() == index[-5000:].tolist()


def write_fake_imagefolder(root, classes=("ant", "bee"), per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def test_fake_imagenet_folders(tmp_path):
    write_fake_imagefolder(str(tmp_path / "data"))
    train, val, test = get_dataloaders(make_args(tmp_path, data="ImageNet", batch_size=4))
    assert val is test and len(train.dataset) == 4 and len(test.dataset) == 4
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 224, 224) and sorted(labels.tolist()) == [0, 0, 1, 1]
    images, labels = next(iter(test))
    assert images.shape == (4, 3, 224, 224) and labels.tolist() == [0, 0, 1, 1]
    # Evaluation: Resize(256) of the short side, then the central 224x224.
    with Image.open(tmp_path / "data" / "val" / "ant" / "0.png") as image:
        expected = torchvision.transforms.functional.center_crop(
            torchvision.transforms.functional.resize(image.convert("RGB"), 256), 224)
    assert torch.allclose(images[:1], normalised(np.asarray(expected)[None], "ImageNet"), atol=1e-6)
    with pytest.raises(ValueError, match="carves 50000 validation images"):
        get_dataloaders(make_args(tmp_path, data="ImageNet", use_valid=True))
