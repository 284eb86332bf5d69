"""SyntheticShapes: determinism, layout, balance and the difficulty construction."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from ranet_fast.data import SyntheticShapes, save_preview
from ranet_fast.data import synthetic


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_same_seed_same_bytes_and_different_seed_different_images():
    first = SyntheticShapes("train", 600, seed=3)
    again = SyntheticShapes("train", 600, seed=3)
    assert digest(first.data) == digest(again.data)
    assert first.targets == again.targets
    assert torch.equal(first.difficulty, again.difficulty)
    other = SyntheticShapes("train", 600, seed=4)
    assert digest(first.data) != digest(other.data)
    # Not just a relabelling: almost every image differs.
    assert (first.data != other.data).reshape(600, -1).any(axis=1).mean() > 0.99


def test_independent_of_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = SyntheticShapes("val", 520).data
        torch.set_num_threads(max(2, threads))
        multi = SyntheticShapes("val", 520).data
    finally:
        torch.set_num_threads(threads)
    assert digest(single) == digest(multi)


def test_sample_depends_only_on_seed_split_and_index():
    short = SyntheticShapes("test", 130)
    long = SyntheticShapes("test", 700)
    assert np.array_equal(short.data, long.data[:130])
    assert short.targets == long.targets[:130]


def test_splits_are_disjoint_streams():
    train, val, test = (SyntheticShapes(split, 500).data for split in ("train", "val", "test"))
    hashes = [{digest(image) for image in data} for data in (train, val, test)]
    assert not hashes[0] & hashes[1] and not hashes[0] & hashes[2] and not hashes[1] & hashes[2]


def test_layout_dtypes_and_items():
    ds = SyntheticShapes("val", 40)
    assert len(ds) == 40
    assert ds.data.shape == (40, 32, 32, 3) and ds.data.dtype == np.uint8
    assert all(isinstance(t, int) and 0 <= t < 10 for t in ds.targets)
    assert ds.difficulty.dtype == torch.int64 and set(ds.difficulty.tolist()) <= {0, 1}
    image, label = ds[5]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert np.array_equal(np.asarray(image), ds.data[5]) and label == ds.targets[5]
    tensor_ds = SyntheticShapes("val", 40, transform=lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert torch.equal(tensor_ds[5][0], torch.from_numpy(ds.data[5]))
    assert len(SyntheticShapes("val")) == synthetic.DEFAULT_SIZES["val"] == 2000


def test_classes_and_difficulties_are_balanced():
    ds = SyntheticShapes("train", 2 * synthetic.CHUNK_SIZE)
    targets = np.array(ds.targets)
    difficulty = ds.difficulty.numpy()
    for label in range(10):
        for level in (0, 1):
            assert ((targets == label) & (difficulty == level)).sum() == 2 * synthetic.CHUNK_SIZE // 20
    variant = ds.variant.numpy()
    assert np.array_equal(variant == synthetic.EASY, difficulty == 0)
    small, texture = (variant == synthetic.SMALL_SHAPE).sum(), (variant == synthetic.TEXTURE).sum()
    assert small + texture == len(ds) // 2 and abs(small - texture) < 0.15 * len(ds) // 2


def _translates(tile: np.ndarray) -> list[np.ndarray]:
    return [np.roll(tile, (dr, dc), axis=(0, 1)) for dr in range(4) for dc in range(4)]


def test_textures_are_flip_consistent_and_distinct():
    tiles = synthetic._TEXTURES
    assert tiles.shape == (10, 4, 4)
    for label, tile in enumerate(tiles):
        # A horizontal flip (the training augmentation) gives the same texture, shifted.
        assert any(np.array_equal(tile[:, ::-1], t) for t in _translates(tile)), label
    # Colours are random, so a texture and its complement (fg/bg swapped) look alike:
    # classes must differ under every shift and under complement.
    for a in range(10):
        variants_a = _translates(tiles[a]) + _translates(1 - tiles[a])
        for b in range(a + 1, 10):
            assert not any(np.array_equal(tiles[b], t) for t in variants_a), (a, b)


def test_shapes_are_mirror_symmetric_and_distinct():
    grid = np.arange(-60, 61) / 50.0  # exactly symmetric around 0
    v, u = np.meshgrid(grid, grid, indexing="ij")
    masks = [synthetic._shape_mask(label, u, v) for label in range(10)]
    for label, mask in enumerate(masks):
        assert np.array_equal(mask, mask[:, ::-1]), label
        assert 0.1 < mask.mean() < 0.7, label
    for a in range(10):
        for b in range(a + 1, 10):
            # At least 10% of the union differs between any two classes' shapes.
            union = (masks[a] | masks[b]).sum()
            assert (masks[a] ^ masks[b]).sum() > 0.1 * union, (a, b)


def test_textures_vanish_under_4x4_average_pooling():
    ds = SyntheticShapes("train", synthetic.CHUNK_SIZE)
    images = ds.data[ds.variant.numpy() == synthetic.TEXTURE].astype(np.float64)
    blocks = images.reshape(-1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 8, 8, 16, 3)
    within_block_spread = blocks.std(axis=3).mean(axis=3)  # [image, 8, 8]
    pooled = blocks.mean(axis=3)  # [image, 8, 8, channel]: the 4x4 average-pooled image
    # Blocks holding texture spread widely (the two colours differ by >= 0.3 * 255 per
    # channel); blocks outside the rectangle only hold noise (sigma 0.05 * 255). A textured
    # block whose four neighbours are textured too lies wholly inside the rectangle.
    textured = np.pad(within_block_spread > 30, ((0, 0), (1, 1), (1, 1)))
    interior = (textured[:, 1:-1, 1:-1] & textured[:, :-2, 1:-1] & textured[:, 2:, 1:-1]
                & textured[:, 1:-1, :-2] & textured[:, 1:-1, 2:])
    full_res, after_pooling = [], []
    for spread, means, inside in zip(within_block_spread, pooled, interior):
        if inside.sum() >= 4:
            full_res.append(spread[inside].mean())
            after_pooling.append(means[inside].std(axis=0).mean())
    assert len(full_res) > 0.8 * len(images)
    # Full resolution shows the texture; after pooling the blocks inside the rectangle all
    # have one colour, up to the noise averaged over 16 pixels (12.75 / 4 ~ 3.2).
    assert np.median(full_res) > 35
    assert max(after_pooling) < 6


def test_normalisation_constants_match_the_default_training_split():
    data = SyntheticShapes("train").data.astype(np.float64) / 255.0
    assert data.mean(axis=(0, 1, 2)) == pytest.approx(synthetic.MEAN, abs=5e-4)
    assert data.std(axis=(0, 1, 2)) == pytest.approx(synthetic.STD, abs=5e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SyntheticShapes("dev")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        SyntheticShapes("train", 0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        SyntheticShapes("train", 10, seed=-1)


def test_save_preview_writes_a_png_grid(tmp_path):
    path = save_preview(tmp_path / "preview.png", n=16, scale=2)
    with Image.open(path) as image:
        assert image.format == "PNG"
        # 8 columns of 64-px tiles with 2-px padding; 2 rows.
        assert image.size == (8 * 66 + 2, 2 * 66 + 2)


def test_model_tables_agree_with_the_generator():
    from ranet_fast.models.configs import IMAGE_SIZES, NUM_CLASSES
    from ranet_fast.data import synthetic

    assert NUM_CLASSES["synthetic"] == synthetic.NUM_CLASSES
    assert IMAGE_SIZES["synthetic"] == synthetic.IMAGE_SIZE
