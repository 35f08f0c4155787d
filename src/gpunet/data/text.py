"""Character-level text: the embedded Tiny Shakespeare, its vocabulary, training windows."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy

SHAKESPEARE = Path(__file__).parent / "shakespeare" / "input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass
class TextDataset:
    name: str
    vocabulary: str  # the distinct characters, sorted; a character's id is its position
    train: numpy.ndarray  # int64 ids
    val: numpy.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)


def encode(text: str, vocabulary: str) -> numpy.ndarray:
    """Characters -> int64 ids; a character outside the vocabulary is a ValueError naming it."""
    index = {ch: i for i, ch in enumerate(vocabulary)}
    try:
        return numpy.fromiter((index[ch] for ch in text), dtype="int64", count=len(text))
    except KeyError as exc:
        position = next(i for i, ch in enumerate(text) if ch not in index)
        raise ValueError(f"character {exc.args[0]!r} at position {position} is not in the model's "
                         f"vocabulary of {len(vocabulary)} characters") from None


def decode(ids: Iterable[int] | numpy.ndarray, vocabulary: str) -> str:
    return "".join(vocabulary[int(i)] for i in ids)


def read_text(path, sha256: str | None = None) -> str:
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} does not match the expected "
                         f"{sha256}; the file is damaged (reinstall gpunet)")
    return data.decode("utf-8")


def load_shakespeare(val_fraction: float = 0.1) -> TextDataset:
    """Tiny Shakespeare: the first 1 - val_fraction of the characters train, the rest validate."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = read_text(SHAKESPEARE, SHAKESPEARE_SHA256)
    vocabulary = "".join(sorted(set(text)))
    ids = encode(text, vocabulary)
    cut = int(len(ids) * (1.0 - val_fraction))
    return TextDataset("shakespeare", vocabulary, ids[:cut], ids[cut:])


class CharWindows:
    """A training source for gn.fit: each sample is a random window of `context` ids and the
    same window shifted by one (the next-character targets). An epoch has as many windows as
    the text holds end to end."""

    def __init__(self, ids: numpy.ndarray, context: int):
        if len(ids) <= context:
            raise ValueError(f"text of {len(ids)} characters is too short for windows of {context}")
        self.ids, self.context = ids, context

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.context

    def get(self, indices, rng: numpy.random.Generator):
        starts = rng.integers(0, len(self.ids) - self.context, size=len(indices))
        rows = starts[:, None] + numpy.arange(self.context)
        return self.ids[rows], self.ids[rows + 1]


def consecutive_windows(ids: numpy.ndarray, context: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The text cut end to end into (inputs, targets) windows: every character is predicted once."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"text of {len(ids)} characters is too short for windows of {context}")
    return ids[: n * context].reshape(n, context), ids[1 : n * context + 1].reshape(n, context)
