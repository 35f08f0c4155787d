"""model.predict: class ids and probabilities for raw inputs, through the model's stored preprocessing."""
from __future__ import annotations

from typing import NamedTuple

import numpy

from gpunet import validate
from gpunet.backend import ops_for, ops_for_device, to_device, to_numpy
from gpunet.preprocess import apply_preprocess


class Prediction(NamedTuple):
    classes: numpy.ndarray  # int64 class ids: (N,), or (N, T) for a character model
    probabilities: numpy.ndarray  # float32 softmax of the outputs: (N, classes) or (N, T, classes)


def predict(model, inputs, batch_size: int = 1000) -> Prediction:
    """Run model in eval mode over raw inputs (images as stored, e.g. uint8 0..255, or character ids)
    batch by batch, after model.preprocess; its outputs are taken as logits over the last axis."""
    validate.positive_int("predict: batch_size", batch_size)
    spec = getattr(model, "preprocess", None)
    x = inputs if type(inputs).__module__.startswith("cupy") else numpy.asarray(inputs)
    if x.ndim == 0:
        raise ValueError(f"predict: inputs must be a batch (first axis: samples), got a scalar of dtype {x.dtype}")
    validate.not_empty(len(x), "predict: inputs")
    if spec and spec.get("kind") == "image":
        validate.images(x if isinstance(x, numpy.ndarray) else to_numpy(x), spec, "predict: inputs")
    xp = ops_for_device(model.device).xp
    was_training = model.training
    model.eval()
    classes, probabilities = [], []
    try:
        for begin in range(0, len(x), batch_size):
            batch = apply_preprocess(spec, to_device(x[begin : begin + batch_size], model.device), xp)
            logits = model.forward(batch)
            probs = ops_for(logits, op="predict").softmax(logits, axis=-1)
            classes.append(to_numpy(probs.argmax(axis=-1)).astype("int64"))
            probabilities.append(to_numpy(probs))
    finally:
        model.train(was_training)
    return Prediction(numpy.concatenate(classes), numpy.concatenate(probabilities))
