"""A user's own data for `gpunet train --data PATH`: a folder of images and labels, or a text file.

Images: PATH holds train_images and train_labels, and optionally val_images and val_labels, each as
NAME.npy or NAME.idx / NAME.idx.gz (IDX, as MNIST). Images are raw pixel values 0..255 (any integer or
float dtype), of shape (N, H, W), (N, C, H, W) or (N, features); labels are whole class numbers 0..K-1,
one per image. Without val_* files a seeded random --val-fraction of the training images validates, as
for the built-in sets. Text: PATH is a UTF-8 file; its first 1 - val_fraction of the characters train
and the rest validate, as for Tiny Shakespeare. Every refusal is one line naming the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy

from gpunet import validate
from gpunet.layers.inputs import image_dims
from gpunet.data.datasets import Dataset, split, too_small
from gpunet.data.idx import read_idx
from gpunet.data.text import TextDataset, encode

SUFFIXES = (".npy", ".idx", ".idx.gz")
PARTS = ("train_images", "train_labels", "val_images", "val_labels")
PIXELS = {"kind": "image", "scale": 1.0 / 255.0}  # the range check of the built-in sets' preprocessing


def read_array(path) -> numpy.ndarray:
    """An .npy file (never unpickled) or else an IDX file (.idx, .idx.gz, MNIST's -ubyte names)."""
    path = Path(path)
    validate.not_special_file(path)  # /dev/zero or a FIFO: reading would never end or never start
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an .npy or IDX file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() != ".npy":
        return read_idx(path)
    try:
        return numpy.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ValueError(f"{path}: holds Python objects, not a plain NumPy array (gpunet never unpickles); "
                             "save it with a numeric dtype") from None
        raise ValueError(f"{path}: not a readable .npy file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npy file ({exc})") from None


def load(path, recipe, val_fraction: float, seed: int, holdout: int = 0):
    """(dataset, recipe) for `gpunet train --data path`: the recipe adapted to the data's image size."""
    path = Path(path)
    validate.not_special_file(path, "--data")  # /dev/zero or a FIFO: reading would never end or never start
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if recipe.kind == "text":
        if path.is_dir():
            raise ValueError(f"--data {path} is a folder, but a character model takes a UTF-8 text file")
        if holdout:
            raise ValueError("--holdout takes images; a text file keeps its validation part (the last "
                             "--val-fraction of the characters) out of training already")
        return load_text(path, val_fraction, recipe.context), recipe
    if not path.is_dir():
        raise NotADirectoryError(f"--data {path} is a file, but an image model takes a folder holding "
                                 f"train_images and train_labels ({', '.join(SUFFIXES)})")
    ds = load_images(path, val_fraction, seed, holdout)
    return ds, _fitted(recipe, ds.x_train, path)


def _fitted(recipe, x, folder):
    """The recipe for images shaped as x: an MLP takes any size, flattened; the CNN takes 28x28."""
    shape = tuple(int(s) for s in x.shape[1:])
    features = math.prod(shape)
    if math.prod(recipe.input_shape) == features or len(recipe.input_shape) == 1:
        shape_in = recipe.input_shape if math.prod(recipe.input_shape) == features else (features,)
    else:
        raise ValueError(f"{folder}: images of shape {shape} do not fit this model's input {tuple(recipe.input_shape)}"
                         " (the cnn takes 28x28 single-channel images; --model mlp takes any size)")
    # random shifts move the last two axes of single-channel images only
    shift = recipe.shift if len(shape) == 2 or (len(shape) == 3 and shape[0] == 1) else 0
    return dataclasses.replace(recipe, input_shape=tuple(shape_in), shift=shift)


def _part(folder: Path, stem: str) -> Path | None:
    found = [folder / (stem + suffix) for suffix in SUFFIXES if (folder / (stem + suffix)).exists()]
    if len(found) > 1:
        raise ValueError(f"{folder}: both {found[0].name} and {found[1].name} are there; keep one {stem}")
    return found[0] if found else None


def load_images(folder, val_fraction: float, seed: int, holdout: int = 0) -> Dataset:
    folder = Path(folder)
    found = {stem: _part(folder, stem) for stem in PARTS}
    files = {stem: path for stem, path in found.items() if path is not None}
    for stem in ("train_images", "train_labels"):
        if stem not in files:
            raise FileNotFoundError(f"--data {folder}: no {stem} file in it ({' or '.join(stem + s for s in SUFFIXES)})")
    if ("val_images" in files) != ("val_labels" in files):
        given = "val_images" if "val_images" in files else "val_labels"
        raise FileNotFoundError(f"--data {folder}: {given} is there but not its "
                                f"{'val_labels' if given == 'val_images' else 'val_images'}; give both or neither")
    x, y = _pair(files["train_images"], files["train_labels"])
    too_small(len(x), str(files["train_images"]))  # before --holdout, which a user may not have given
    if isinstance(holdout, bool) or not 0 <= holdout <= len(x) - 2:
        raise ValueError(f"--holdout must be from 0 to {len(x) - 2} ({files['train_images']} has {len(x)} images), "
                         f"got {holdout}")
    kept = len(x) - holdout
    held_x, held_y = x[kept:], y[kept:]
    x, y = x[:kept], y[:kept]
    if "val_images" in files:
        x_val, y_val = _pair(files["val_images"], files["val_labels"])
        if x_val.shape[1:] != x.shape[1:]:
            raise ValueError(f"{files['val_images']}: images of shape {x_val.shape[1:]}, but the training images "
                             f"are {x.shape[1:]}")
        parts = (x, y, x_val, y_val)
    else:
        parts = split(x, y, val_fraction, seed)
    classes = max(int(y.max()), int(parts[3].max()), int(held_y.max()) if holdout else 0) + 1
    if classes < 2:
        raise ValueError(f"{files['train_labels']}: every label is 0; a classifier needs at least two classes")
    return Dataset(str(folder), *parts, num_classes=classes, x_holdout=held_x if holdout else None,
                   y_holdout=held_y if holdout else None)


def _pair(images_path: Path, labels_path: Path) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Images and labels, checked as the built-in sets are: pixel values 0..255, whole class numbers."""
    x, y = read_array(images_path), read_array(labels_path)
    validate.not_empty(len(x) if x.ndim else 0, str(images_path), "images")
    image_dims(x, str(images_path))
    validate.images(x, {**PIXELS, "shape": list(x.shape[1:])}, str(images_path))
    if y.ndim != 1:
        raise ValueError(f"{labels_path}: labels must be one number per image, but the file holds an array of "
                         f"shape {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{images_path} has {len(x)} images but {labels_path} has {len(y)} labels")
    if y.dtype.kind in "iuf" and (y < 0).any():
        i = int(numpy.argmax(y < 0))
        raise ValueError(f"{labels_path}: labels must be class numbers 0, 1, 2, ...; found {y[i]} at index {i}")
    validate.class_labels(y, numpy.iinfo("int32").max, str(labels_path))  # numbers, whole ones
    return x, y.astype("int64")


def load_text(path, val_fraction: float, context: int) -> TextDataset:
    """A UTF-8 text file: its distinct characters are the vocabulary; the last val_fraction validates."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); "
                         "save it as UTF-8") from None
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    vocabulary = "".join(sorted(set(text)))
    ids = encode(text, vocabulary)
    cut = int(len(ids) * (1.0 - val_fraction))
    for part, size in (("training", cut), ("validation", len(ids) - cut)):
        if size <= context:
            raise ValueError(f"{path}: {len(text)} characters leave {size} for {part}, too few for windows of "
                             f"{context} characters; give a longer text" + (" or a larger --val-fraction"
                                                                             if part == "validation" else ""))
    return TextDataset(os.fspath(path), vocabulary, ids[:cut], ids[cut:])
