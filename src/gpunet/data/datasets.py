"""Named datasets: the embedded MNIST sample, the official MNIST (on request), Tiny Shakespeare."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy

from gpunet.data.idx import read_idx
from gpunet.data.mnist import load_mnist
from gpunet.data.text import TextDataset, load_shakespeare

SAMPLE_DIR = Path(__file__).parent / "mnist_sample"


@dataclass
class Dataset:
    name: str
    x_train: numpy.ndarray
    y_train: numpy.ndarray
    x_val: numpy.ndarray
    y_val: numpy.ndarray
    num_classes: int
    # the last `holdout` samples of the file, kept out of training and validation to score the result
    x_holdout: numpy.ndarray | None = None
    y_holdout: numpy.ndarray | None = None


def too_small(n: int, where: str) -> None:
    """Refuse a data set of fewer than 2 images: one trains and one validates at the least."""
    if n < 2:
        raise ValueError(f"{where}: the data set is too small: it holds {n} image{'' if n == 1 else 's'}, and "
                         "training needs at least 2 (one to train on, one to validate)")


def split(x: numpy.ndarray, y: numpy.ndarray, val_fraction: float, seed: int
          ) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """A seeded random split into (x_train, y_train, x_val, y_val)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = numpy.random.default_rng(seed).permutation(len(x))
    n_val = min(max(1, int(round(len(x) * val_fraction))), len(x) - 1)  # one image at least trains
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def load_mnist_sample() -> tuple[numpy.ndarray, numpy.ndarray]:
    """The 8,000 real MNIST digits shipped with gpunet: (images uint8 (8000, 28, 28), labels)."""
    return (read_idx(SAMPLE_DIR / "train-images-idx3-ubyte.gz"),
            read_idx(SAMPLE_DIR / "train-labels-idx1-ubyte.gz"))


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = False, val_fraction: float = 0.1,
                 seed: int = 0, holdout: int = 0) -> Dataset | TextDataset:
    """A dataset by name. Images are split at random (seeded); text is split in order.
    holdout: the last `holdout` images (in file order) are carved out first, into x_holdout and
    y_holdout, and never reach the training or validation split (images only)."""
    if name == "shakespeare":
        if holdout:
            raise ValueError(f"holdout takes images; {name} keeps its validation text (the last val_fraction of "
                             "the characters) out of training already")
        return load_shakespeare(val_fraction)
    if name == "mnist-sample":
        x, y = load_mnist_sample()
    elif name == "mnist":
        (x, y), _ = load_mnist(data_dir, download)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    too_small(len(x), name if data_dir is None else f"{name} in {data_dir}")
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout <= len(x) - 2:
        raise ValueError(f"holdout must be a whole number of images from 0 to {len(x) - 2} ({name} has {len(x)}), "
                         f"got {holdout!r}")
    kept = len(x) - holdout
    held = (x[kept:], y[kept:]) if holdout else (None, None)
    return Dataset(name, *split(x[:kept], y[:kept], val_fraction, seed), num_classes=10,
                   x_holdout=held[0], y_holdout=held[1])


DATASETS = ("mnist-sample", "mnist", "shakespeare")
TEXT_DATASETS = ("shakespeare",)
