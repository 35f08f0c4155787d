"""A model summary: each layer, its output shape and parameter count; the activation memory a forward keeps."""
from __future__ import annotations

import numpy

from gpunet.backend import ops_for_device


def summary(model, input_shape, input_dtype="float32") -> str:
    """Table of layers with output shapes for one sample of input_shape (run in eval mode); a graph model
    (gn.Model) lists its nodes with the shapes found when it was built, a shared layer's parameters once."""
    rows = [("layer", "output shape", "params")]
    if hasattr(model, "nodes"):
        seen = set()
        for name, layer, shapes in model.nodes():
            rows.append((f"{name}: {layer.describe()}", ", ".join(str(s) for s in shapes),
                         f"{0 if name in seen else layer.num_params():,}"))
            seen.add(name)
    else:
        layers = getattr(model, "layers", [model])
        was_training = model.training
        model.eval()
        x = model_input(model, input_shape, input_dtype)
        try:
            for i, layer in enumerate(layers):
                x = layer.forward(x)
                rows.append((f"{i}: {layer.describe()}", str(tuple(x.shape[1:])), f"{layer.num_params():,}"))
        finally:
            model.train(was_training)
    rows.append(("total", "", f"{model.num_params():,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def model_input(model, input_shape, dtype):
    return ops_for_device(model.device).zeros((1, *input_shape), dtype=dtype)


def saved_bytes(model) -> int:
    """The bytes of the arrays model and every layer under it keep from their last forward for the backward
    (what save_for_backward saved): the activation memory of a training step, each byte of memory counted once
    (views of one array, or one array saved by two layers, share it: the union of the arrays' address ranges)."""
    ranges: list[tuple[int, int]] = []

    def count(value) -> None:
        if hasattr(value, "nbytes") and hasattr(value, "strides") and hasattr(value, "shape"):
            ranges.append(_address_range(value))
        elif isinstance(value, (list, tuple)):
            for item in value:
                count(item)
        elif isinstance(value, dict):
            for item in value.values():
                count(item)
        elif hasattr(value, "__dict__") and not callable(value):
            for item in vars(value).values():
                count(item)

    for layer in model._subtree():
        if layer._saved is not None:
            count(vars(layer._saved))
    total, reached = 0, None
    for low, high in sorted(ranges):
        start = low if reached is None else max(low, reached)
        if high > start:
            total += high - start
        reached = high if reached is None else max(reached, high)
    return total


def _address_range(a) -> tuple[int, int]:
    """[first byte, past the last byte) of an array's elements: a NumPy array's or a CuPy array's (data.ptr)."""
    start = a.ctypes.data if isinstance(a, numpy.ndarray) else a.data.ptr  # (a bfloat16 array has no buffer)
    if a.size == 0:
        return start, start
    low = high = start
    for n, stride in zip(a.shape, a.strides):
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    return low, high + a.itemsize
