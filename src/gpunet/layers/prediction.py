"""model.predict: class ids and probabilities for raw inputs, through the model's stored preprocessing."""
from __future__ import annotations

from typing import NamedTuple

import numpy

from gpunet import validate
from gpunet.backend import ops_for, ops_for_device, to_device, to_numpy
from gpunet.layers import inputs as arrays
from gpunet.errors import out_of_memory
from gpunet.preprocess import apply_preprocess


class Prediction(NamedTuple):
    classes: numpy.ndarray  # int64 class ids: (N,), or (N, T) for a character model
    probabilities: numpy.ndarray  # float32 softmax of the outputs: (N, classes) or (N, T, classes)


def predict(model, inputs, batch_size: int = 1000) -> Prediction:
    """Run model in eval mode over raw inputs (images as stored, e.g. uint8 0..255, or character ids)
    batch by batch, after model.preprocess; its outputs are taken as logits over the last axis. inputs
    may be nested Python lists (converted as gpunet.layers.inputs says); NaN or Inf is refused."""
    validate.positive_int("predict: batch_size", batch_size)
    spec = getattr(model, "preprocess", None)
    x = arrays.inputs(model, inputs, "predict")
    if x.ndim == 0:
        raise ValueError(f"predict: inputs must be a batch (first axis: samples), got a scalar of dtype {x.dtype}")
    validate.not_empty(len(x), "predict: inputs")
    host = x if isinstance(x, numpy.ndarray) else None  # a CuPy array is not copied to the host to be checked
    if host is not None:
        validate.finite_array(host, "predict")
    if spec and spec.get("kind") == "image":
        arrays.image_dims(x, "predict: inputs")
        validate.images(to_numpy(x) if host is None else host, spec, "predict: inputs")
    was_training = model.training
    model.eval()
    try:
        with out_of_memory(model.device, "predicting", min(batch_size, len(x)), "--batch-size, or batch_size= of "
                                                                                 "model.predict"):
            return _batches(model, spec, x, batch_size)
    finally:
        model.train(was_training)


def _batches(model, spec, x, batch_size: int) -> Prediction:
    xp = ops_for_device(model.device).xp
    classes, probabilities = [], []
    for begin in range(0, len(x), batch_size):
        batch = apply_preprocess(spec, to_device(x[begin : begin + batch_size], model.device), xp)
        logits = model.forward(batch)
        probs = ops_for(logits, op="predict").softmax(logits, axis=-1)
        classes.append(to_numpy(probs.argmax(axis=-1)).astype("int64"))
        probabilities.append(to_numpy(probs))
    return Prediction(numpy.concatenate(classes), numpy.concatenate(probabilities))
