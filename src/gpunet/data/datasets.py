"""Named datasets: the embedded MNIST sample, the official MNIST (on request), Tiny Shakespeare."""
from __future__ import annotations

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


def split(x, y, val_fraction: float, seed: int):
    """A seeded random split into (x_train, y_train, x_val, y_val)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = numpy.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def load_mnist_sample():
    """The 8,000 real MNIST digits shipped with gpunet: (images uint8 (8000, 28, 28), labels)."""
    return (read_idx(SAMPLE_DIR / "train-images-idx3-ubyte.gz"),
            read_idx(SAMPLE_DIR / "train-labels-idx1-ubyte.gz"))


def load_dataset(name: str, data_dir=None, download: bool = False, val_fraction: float = 0.1,
                 seed: int = 0) -> Dataset | TextDataset:
    """A dataset by name. Images are split at random (seeded); text is split in order."""
    if name == "mnist-sample":
        x, y = load_mnist_sample()
        return Dataset(name, *split(x, y, val_fraction, seed), num_classes=10)
    if name == "mnist":
        (x, y), _ = load_mnist(data_dir, download)
        return Dataset(name, *split(x, y, val_fraction, seed), num_classes=10)
    if name == "shakespeare":
        return load_shakespeare(val_fraction)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


DATASETS = ("mnist-sample", "mnist", "shakespeare")
TEXT_DATASETS = ("shakespeare",)
