"""Applying a model's stored input preprocessing (the spec gpunet.data.image_preprocess or
text_preprocess made, saved in its checkpoint) to raw inputs. A leaf module: the model's own
predict applies it, and the data pipeline re-exports it."""
from __future__ import annotations

import math
import numbers

import numpy

KINDS = ("image", "text")


def check_spec(spec, where: str) -> None:
    """Refuse a spec apply_preprocess could not use (a checkpoint's metadata edited by hand: a string
    for `scale`, a std of 0), in one line starting with `where` and naming the key. A model with several
    inputs has a list of specs, one per input (None: that input as it is)."""
    if isinstance(spec, list):
        for i, one in enumerate(spec):
            if isinstance(one, list):
                raise ValueError(f"{where}: input {i}: a list of preprocessing specs cannot nest")
            check_spec(one, f"{where}: input {i}")
        return
    if spec is None:
        return
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if spec["kind"] == "text":
        vocabulary = spec.get("vocabulary")
        if not isinstance(vocabulary, str) or not vocabulary or len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"{where}: 'vocabulary' must be a non-empty string of distinct characters, "
                             f"got {vocabulary!r:.80}")
        return
    for key in ("scale", "mean", "std"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{where}: {key!r} must be a finite number, got {value!r:.80}")
        if key != "mean" and value <= 0:
            raise ValueError(f"{where}: {key!r} must be positive, got {value!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"{where}: 'shape' must be a list of positive whole numbers, got {shape!r:.80}")


def apply_preprocess(spec: dict | list | None, x, xp=numpy):
    """Raw batch (on host or device) -> model input; a model without a spec takes x as is. A list of specs
    (a model with several inputs) applies one to each array of the list x."""
    if spec is None:
        return x
    if isinstance(spec, list):
        if not isinstance(x, (list, tuple)) or len(x) != len(spec):
            raise ValueError(f"the model's preprocessing is for {len(spec)} inputs; give a list of {len(spec)} arrays")
        return [apply_preprocess(one, a, xp) for one, a in zip(spec, x)]
    if isinstance(x, (list, tuple)):
        raise ValueError(f"the model's preprocessing is for one input, got a list of {len(x)} arrays")
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
