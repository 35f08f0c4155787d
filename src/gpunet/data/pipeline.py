"""Input preprocessing (saved with a model), mini-batches and light image augmentation."""
from __future__ import annotations

import numpy

from gpunet.preprocess import apply_preprocess  # noqa: F401  (a leaf, so that a model can apply it: predict)


def image_preprocess(images: numpy.ndarray, shape) -> dict:
    """A standardisation spec from training images: float32 = (uint8 / 255 - mean) / std,
    reshaped to (N, *shape). It is JSON-able and travels in the checkpoint's metadata."""
    scaled = images.astype("float64") / 255.0
    return {"kind": "image", "scale": 1.0 / 255.0, "mean": float(scaled.mean()),
            "std": float(scaled.std()) or 1.0, "shape": [int(s) for s in shape]}


def text_preprocess(vocabulary: str) -> dict:
    """The spec of a character-level model: its inputs are ids into `vocabulary`."""
    return {"kind": "text", "vocabulary": vocabulary}


def minibatches(n: int, batch_size: int, rng: numpy.random.Generator | None, start: int = 0,
                offset: int | None = None):
    """Index arrays of successive batches of a (seeded, shuffled when rng is given) order,
    from batch number `start` on, or from sample `offset` of the order when given (a resumed
    run with another batch size goes on from the same sample); the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = rng.permutation(n) if rng is not None else numpy.arange(n)
    for begin in range(start * batch_size if offset is None else offset, n, batch_size):
        yield order[begin : begin + batch_size]


def random_shift(images: numpy.ndarray, max_shift: int, rng: numpy.random.Generator) -> numpy.ndarray:
    """Shift each (H, W) image by up to max_shift pixels in each direction, filling with zeros."""
    if max_shift <= 0:
        return images
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    flat = images.reshape(n, h, w)
    padded = numpy.pad(flat, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + numpy.arange(h)
    cols = dx[:, None] + numpy.arange(w)
    out = padded[numpy.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.reshape(images.shape)
