"""Applying a model's stored input preprocessing (the spec gpunet.data.image_preprocess or
text_preprocess made, saved in its checkpoint) to raw inputs. A leaf module: the model's own
predict applies it, and the data pipeline re-exports it."""
from __future__ import annotations

import numpy


def apply_preprocess(spec: dict | None, x, xp=numpy):
    """Raw batch (on host or device) -> model input; a model without a spec takes x as is."""
    if spec is None:
        return x
    if spec.get("kind") == "text":
        x = xp.asarray(x)
        if x.dtype.kind not in "iu":
            raise TypeError(f"a text model takes integer character ids, got {x.dtype}")
        return x
    if spec.get("kind") != "image":
        raise ValueError(f"unknown preprocessing kind {spec.get('kind')!r}")
    x = xp.asarray(x)
    expected = int(numpy.prod(spec["shape"]))
    if x.size % expected or x.ndim < 2:
        raise ValueError(f"input of shape {tuple(x.shape)} does not hold images of shape {tuple(spec['shape'])}")
    out = x.reshape(len(x), *spec["shape"]).astype("float32")
    out *= numpy.float32(spec["scale"] / spec["std"])
    out -= numpy.float32(spec["mean"] / spec["std"])
    return out
