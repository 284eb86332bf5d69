"""A procedurally generated 32x32 RGB data set in which resolution matters.

``SyntheticShapes`` needs no download and is built so that a resolution adaptive
network has something to adapt to: about half of the images can be classified from
coarse features, the other half only from fine detail.

Each of the 10 classes owns one *shape* and one *texture*:

======  ===============  =====================================================
class   shape            texture (1-2 px features, period 2 or 4)
======  ===============  =====================================================
0       disk             1-px checkerboard
1       square           horizontal lines, period 2
2       triangle         vertical lines, period 2
3       plus             horizontal bands, period 4
4       x-cross          vertical bands, period 4
5       ring             dots (every other pixel, every other row)
6       diamond          square grid, period 4
7       frame            2-px checkerboard
8       two bars         horizontal dashes
9       t-shape          diagonal cross-hatching, period 4
======  ===============  =====================================================

Every sample is one of three variants:

* ``easy`` (difficulty 0, 50 %): one large shape, 14-24 px, flat colours, mild noise.
  Recognisable after 4x down-sampling (an 8x8 image still shows a 4-6 pixel shape).
* ``small shape`` (difficulty 1, 25 %): the class shape at 5-8 px among two soft
  decoy blobs of about the same size, on a background with a random colour gradient
  and stronger noise. After 4x down-sampling the shape is a 1-2 pixel dot that looks
  like the decoys.
* ``texture`` (difficulty 1, 25 %): a random rectangle filled with the class texture.
  Every texture is periodic with a period dividing 4 in both directions, so averaging
  any 4x4 window gives the same colour: after 4x average pooling the class is
  invisible, only a flat rectangle remains.

Colours are random (foreground differs from background by 0.3-0.7 in every channel),
so neither colour nor mean intensity identifies the class. Shapes are rotated by at
most 12 degrees and every shape and texture is mirror symmetric up to a shift, so the
CIFAR augmentation (random crop with padding, horizontal flip) keeps labels valid.

Determinism: samples are generated in fixed chunks of ``CHUNK_SIZE``; chunk ``c`` of
split ``s`` draws all its randomness from ``numpy.random.default_rng([_SEED_TAG, seed,
split id, c])``. Sample ``i`` therefore depends only on ``(seed, split, i)``: the same
seed gives the same bytes on every run, whatever the number of threads (NumPy's
element-wise maths is single-threaded), a shorter split is a prefix of a longer one,
and the three splits never share a random stream. Rendering is in float64 and
quantised once to uint8. (NumPy does not promise identical ``Generator`` streams across
NumPy versions, nor its vectorised ``exp``/``sin`` identical last bits across CPU types;
a different NumPy or CPU could therefore shift rare pixels by one grey level.)
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 32
NUM_CLASSES = 10
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 10000, "val": 2000, "test": 2000}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
CLASS_NAMES = (
    "disk", "square", "triangle", "plus", "x-cross",
    "ring", "diamond", "frame", "two-bars", "t-shape",
)
VARIANT_NAMES = ("easy", "small shape", "texture")
EASY, SMALL_SHAPE, TEXTURE = 0, 1, 2

# Every chunk holds each (class, easy/hard) pair equally often, so CHUNK_SIZE must be a
# multiple of 2 * NUM_CLASSES; full chunks are exactly class- and difficulty-balanced.
CHUNK_SIZE = 500
_SEED_TAG = 0x5241_4E65  # keeps these streams apart from other users of the same seed
_SUPERSAMPLE = 2  # shapes are rendered at 2x resolution and averaged: anti-aliased edges

# Per-channel statistics of the default training split (seed 0, 10000 images), used by
# the data loaders for normalisation; tests/test_synthetic.py recomputes them.
MEAN = (0.5007, 0.5004, 0.4999)
STD = (0.2875, 0.2872, 0.2862)


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of class ``label``'s shape in normalised coordinates.

    ``u`` points right, ``v`` points down; the shape fills roughly [-1, 1]^2.
    """
    au, av = np.abs(u), np.abs(v)
    radius2 = u * u + v * v
    if label == 0:  # disk
        return radius2 <= 1.0
    if label == 1:  # square, slightly smaller so its area is close to the disk's
        return np.maximum(au, av) <= 0.85
    if label == 2:  # triangle, apex up
        return (v >= -0.9) & (v <= 0.9) & (au <= (v + 0.9) / 1.8)
    if label == 3:  # plus
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if label == 4:  # x-cross: the plus turned by 45 degrees
        a, b = np.abs(u + v) / np.sqrt(2.0), np.abs(u - v) / np.sqrt(2.0)
        return ((a <= 0.3) & (b <= 1.0)) | ((b <= 0.3) & (a <= 1.0))
    if label == 5:  # ring
        return (radius2 >= 0.55 ** 2) & (radius2 <= 1.0)
    if label == 6:  # diamond
        return au + av <= 1.0
    if label == 7:  # frame (hollow square)
        edge = np.maximum(au, av)
        return (edge >= 0.45) & (edge <= 0.85)
    if label == 8:  # two horizontal bars
        return (au <= 0.9) & (av >= 0.25) & (av <= 0.7)
    if label == 9:  # t-shape
        top_bar = (v >= -0.9) & (v <= -0.45) & (au <= 0.9)
        stem = (au <= 0.25) & (v >= -0.9) & (v <= 0.9)
        return top_bar | stem
    raise ValueError(f"no shape for label {label}")


def _texture_tiles() -> np.ndarray:
    """The 10 class textures as binary 4x4 tiles, indexed [label, row mod 4, col mod 4]."""
    row, col = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    patterns = [
        (row + col) % 2 == 0,                                  # 1-px checkerboard
        row % 2 == 0,                                          # horizontal lines
        col % 2 == 0,                                          # vertical lines
        row < 2,                                               # horizontal bands
        col < 2,                                               # vertical bands
        (row % 2 == 0) & (col % 2 == 0),                       # dots
        (row == 0) | (col == 0),                               # grid
        ((row // 2) + (col // 2)) % 2 == 0,                    # 2-px checkerboard
        (row % 2 == 0) & (col < 2),                            # dashes
        ((row + col) % 4 == 0) | ((row - col) % 4 == 0),       # cross-hatching
    ]
    return np.stack(patterns).astype(np.float64)


_TEXTURES = _texture_tiles()


def _random_colours(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground colours that differ by 0.3-0.7 in every channel."""
    background = rng.random((count, 3))
    foreground = (background + rng.uniform(0.3, 0.7, (count, 3))) % 1.0
    return background, foreground


def _shape_coverage(labels, centre_x, centre_y, half, angle) -> np.ndarray:
    """Fraction of each pixel covered by the sample's shape, [n, 32, 32], by supersampling."""
    count, size, fine = len(labels), IMAGE_SIZE, IMAGE_SIZE * _SUPERSAMPLE
    sub = (np.arange(fine) + 0.5) / _SUPERSAMPLE  # sub-pixel centres in pixel units
    dx = sub[None, None, :] - centre_x[:, None, None]
    dy = sub[None, :, None] - centre_y[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / half[:, None, None]
    v = (-sin * dx + cos * dy) / half[:, None, None]
    inside = np.zeros((count, fine, fine), dtype=bool)
    for label in range(NUM_CLASSES):
        chosen = labels == label
        inside[chosen] = _shape_mask(label, u[chosen], v[chosen])
    return inside.reshape(count, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))


def _cluttered_background(background, gradient_angle, gradient_amplitude, blob_x, blob_y, blob_sigma,
                          blob_colour) -> np.ndarray:
    """Background of a small-shape sample, [n, 32, 32, 3]: a colour ramp plus soft decoy blobs."""
    size = IMAGE_SIZE
    pix = np.arange(size) + 0.5 - size / 2
    ramp = (pix[None, None, :] * np.cos(gradient_angle)[:, None, None]
            + pix[None, :, None] * np.sin(gradient_angle)[:, None, None]) / (size / 2)
    canvas = background[:, None, None, :] + ramp[..., None] * gradient_amplitude[:, None, None, :]
    pix = np.arange(size) + 0.5
    for blob in range(blob_x.shape[1]):
        distance2 = ((pix[None, None, :] - blob_x[:, blob, None, None]) ** 2
                     + (pix[None, :, None] - blob_y[:, blob, None, None]) ** 2)
        alpha = (0.9 * np.exp(-distance2 / (2 * blob_sigma[:, blob, None, None] ** 2)))[..., None]
        canvas = (1 - alpha) * canvas + alpha * blob_colour[:, blob, None, None, :]
    return canvas


def _textured_rectangles(labels, phase, rect_x, rect_y, rect_w, rect_h, foreground, background,
                         outside_colour) -> np.ndarray:
    """Texture samples, [n, 32, 32, 3]: the class texture inside a rectangle, flat outside."""
    index = np.arange(IMAGE_SIZE)
    rows = (index[None, :, None] + phase[:, 0, None, None]) % 4
    cols = (index[None, None, :] + phase[:, 1, None, None]) % 4
    pattern = _TEXTURES[labels[:, None, None], rows, cols] > 0
    in_rows = (index[None, :] >= rect_y[:, None]) & (index[None, :] < (rect_y + rect_h)[:, None])
    in_cols = (index[None, :] >= rect_x[:, None]) & (index[None, :] < (rect_x + rect_w)[:, None])
    in_rect = in_rows[:, :, None] & in_cols[:, None, :]
    texture = np.where(pattern[..., None], foreground[:, None, None, :], background[:, None, None, :])
    return np.where(in_rect[..., None], texture, outside_colour[:, None, None, :])


def _render_chunk(rng: np.random.Generator, count: int) -> tuple[np.ndarray, ...]:
    """Render ``count`` samples (a multiple of 2 * NUM_CLASSES) from one random stream.

    Returns uint8 images (count, 32, 32, 3), labels, difficulty and variant.
    The order of the draws below fixes the data set: changing it changes every image.
    """
    size = IMAGE_SIZE
    # Balanced (label, difficulty) pairs in random order.
    pairs = rng.permutation(np.arange(count) % (2 * NUM_CLASSES))
    labels, difficulty = pairs % NUM_CLASSES, pairs // NUM_CLASSES
    variant = np.where(difficulty == 0, EASY,
                       np.where(rng.random(count) < 0.5, SMALL_SHAPE, TEXTURE))

    background, foreground = _random_colours(rng, count)
    # Shape geometry (drawn for every sample, used by the shape variants).
    shape_size = np.where(variant == EASY, rng.uniform(14.0, 24.0, count),
                          rng.uniform(5.0, 8.0, count))
    half = shape_size / 2.0
    centre_x = rng.uniform(half, size - half)
    centre_y = rng.uniform(half, size - half)
    angle = rng.uniform(-np.pi / 15, np.pi / 15, count)  # +-12 degrees
    # Clutter for small shapes: a colour gradient and two soft decoy blobs.
    gradient_angle = rng.uniform(0.0, 2 * np.pi, count)
    gradient_amplitude = rng.uniform(0.0, 0.25, (count, 3))
    blob_x = rng.uniform(3.0, size - 3.0, (count, 2))
    blob_y = rng.uniform(3.0, size - 3.0, (count, 2))
    blob_sigma = rng.uniform(1.2, 2.2, (count, 2))
    blob_colour = rng.random((count, 2, 3))
    # Texture rectangles.
    rect_w = rng.integers(16, 29, count)
    rect_h = rng.integers(16, 29, count)
    rect_x = rng.integers(0, size - rect_w + 1)
    rect_y = rng.integers(0, size - rect_h + 1)
    phase = rng.integers(0, 4, (count, 2))
    outside_colour = rng.random((count, 3))
    noise_sigma = np.select([variant == EASY, variant == SMALL_SHAPE], [0.03, 0.06], 0.05)
    noise = rng.standard_normal((count, size, size, 3))

    canvas = np.empty((count, size, size, 3))
    canvas[:] = background[:, None, None, :]
    small = variant == SMALL_SHAPE
    canvas[small] = _cluttered_background(background[small], gradient_angle[small], gradient_amplitude[small],
                                          blob_x[small], blob_y[small], blob_sigma[small], blob_colour[small])
    shape = variant != TEXTURE
    alpha = _shape_coverage(labels[shape], centre_x[shape], centre_y[shape], half[shape], angle[shape])
    alpha = alpha[..., None]
    canvas[shape] = (1 - alpha) * canvas[shape] + alpha * foreground[shape, None, None, :]
    textured = variant == TEXTURE
    canvas[textured] = _textured_rectangles(labels[textured], phase[textured], rect_x[textured], rect_y[textured],
                                            rect_w[textured], rect_h[textured], foreground[textured],
                                            background[textured], outside_colour[textured])
    canvas += noise * noise_sigma[:, None, None, None]
    images = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images, labels.astype(np.int64), difficulty.astype(np.int64), variant.astype(np.int64)


def generate(split: str, num_samples: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Generate ``num_samples`` samples of ``split``.

    Returns ``(images uint8 [N, 32, 32, 3], labels int64 [N], difficulty int64 [N],
    variant int64 [N])``. Sample ``i`` depends only on ``(seed, split, i)``.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    num_chunks = -(-num_samples // CHUNK_SIZE)
    chunks = [
        _render_chunk(np.random.default_rng([_SEED_TAG, int(seed), SPLIT_IDS[split], index]), CHUNK_SIZE)
        for index in range(num_chunks)
    ]
    return tuple(np.concatenate(parts)[:num_samples] for parts in zip(*chunks))


class SyntheticShapes(torch.utils.data.Dataset):
    """Deterministic synthetic 32x32 RGB classification set (see the module docstring).

    Items are ``(PIL.Image (RGB, uint8) or transform(image), int label)``, so the
    CIFAR torchvision transforms apply unchanged.

    Attributes:
        data: uint8 array [N, 32, 32, 3] (HWC, like torchvision's CIFAR10.data).
        targets: list of int labels.
        difficulty: int64 tensor [N], 0 = easy (coarse features suffice), 1 = hard.
        variant: int64 tensor [N], index into ``VARIANT_NAMES``.
    """

    classes = CLASS_NAMES

    def __init__(self, split: str, num_samples: int | None = None, seed: int = 0, transform=None):
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split = split
        self.seed = seed
        self.transform = transform
        count = DEFAULT_SIZES[split] if num_samples is None else num_samples
        images, labels, difficulty, variant = generate(split, count, seed)
        self.data = images
        self.targets = labels.tolist()
        self.difficulty = torch.from_numpy(difficulty)
        self.variant = torch.from_numpy(variant)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, num_samples={len(self)}, seed={self.seed}, "
                f"hard={int(self.difficulty.sum())})")


def save_preview(path: str | os.PathLike, n: int = 32, seed: int = 0, split: str = "train",
                 scale: int = 3) -> str:
    """Save the first ``n`` samples of ``split`` as a PNG grid, easy samples first.

    Rows hold 8 images, each enlarged ``scale`` times with nearest-neighbour
    interpolation so the 1-px textures stay visible. Returns the path.
    """
    from torchvision.utils import save_image

    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    images, _, difficulty, _ = generate(split, n, seed)
    order = np.argsort(difficulty, kind="stable")
    batch = torch.from_numpy(images[order]).permute(0, 3, 1, 2).float() / 255.0
    batch = torch.nn.functional.interpolate(batch, scale_factor=scale, mode="nearest")
    save_image(batch, os.fspath(path), nrow=8, padding=2, pad_value=1.0)
    return os.fspath(path)
