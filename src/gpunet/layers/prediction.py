"""model.predict: class ids and probabilities for raw inputs, through the model's stored preprocessing."""
from __future__ import annotations

from typing import NamedTuple

import numpy

from gpunet import validate
from gpunet.backend import precision as precisions
from gpunet.backend import ops_for, ops_for_device, to_device, to_numpy
from gpunet.layers import inputs as arrays
from gpunet.errors import out_of_memory
from gpunet.preprocess import apply_preprocess


class Prediction(NamedTuple):
    classes: numpy.ndarray  # int64 class ids: (N,), or (N, T) for a character model
    probabilities: numpy.ndarray  # float32 softmax of the outputs: (N, classes) or (N, T, classes)


def predict(model, inputs, batch_size: int = 1000, precision: str = "fp32"):
    """Run model in eval mode over raw inputs (images as stored, e.g. uint8 0..255, or character ids)
    batch by batch, after model.preprocess; its outputs are taken as logits over the last axis. inputs
    may be nested Python lists (converted as gpunet.layers.inputs says); NaN or Inf is refused. A gn.Model
    with several inputs takes a list of them; one with several outputs gives a list of Predictions."""
    validate.positive_int("predict: batch_size", batch_size)
    precisions.check(precision, "predict")
    spec = getattr(model, "preprocess", None)
    x = arrays.inputs(model, inputs, "predict")
    for i, (one, one_spec) in enumerate(zip(x if isinstance(x, list) else [x],
                                            spec if isinstance(spec, list) else [spec])):
        _check(one, one_spec, "predict" if not isinstance(x, list) else f"predict: input {i}")
    was_training = model.training
    model.eval()
    try:
        with out_of_memory(model.device, "predicting", min(batch_size, arrays.samples(x)),
                           "--batch-size, or batch_size= of model.predict"):
            with precisions.using(precision):
                return _batches(model, spec, x, batch_size)
    finally:
        model.train(was_training)


def _check(x, spec, where: str) -> None:
    if x.ndim == 0:
        raise ValueError(f"{where}: inputs must be a batch (first axis: samples), got a scalar of dtype {x.dtype}")
    validate.not_empty(len(x), f"{where}: inputs")
    host = x if isinstance(x, numpy.ndarray) else None  # a CuPy array is not copied to the host to be checked
    if host is not None:
        validate.finite_array(host, where)
    if spec and spec.get("kind") == "image":
        arrays.image_dims(x, f"{where}: inputs")
        validate.images(to_numpy(x) if host is None else host, spec, f"{where}: inputs")


def _batches(model, spec, x, batch_size: int):
    xp = ops_for_device(model.device).xp
    found: list = []
    for begin in range(0, arrays.samples(x), batch_size):
        rows = arrays.take(x, slice(begin, begin + batch_size))
        batch = apply_preprocess(spec, arrays.each(lambda a: to_device(a, model.device), rows), xp)
        outputs = model.forward(batch)
        for i, logits in enumerate(outputs if isinstance(outputs, list) else [outputs]):
            probs = ops_for(logits, op="predict").softmax(logits, axis=-1)
            if len(found) <= i:
                found.append(([], []))
            found[i][0].append(to_numpy(probs.argmax(axis=-1)).astype("int64"))
            found[i][1].append(to_numpy(probs))
    predictions = [Prediction(numpy.concatenate(classes), numpy.concatenate(probs)) for classes, probs in found]
    return predictions if isinstance(outputs, list) else predictions[0]
