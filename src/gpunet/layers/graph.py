"""Symbolic values for graph models (Keras's functional API): `gn.Input(shape)` gives one, and calling a
layer on symbolic values records a node and gives the node's outputs, whose shapes are checked there and
then. gn.Model (gpunet.layers.model) turns the nodes between its inputs and outputs into a program."""
from __future__ import annotations

import itertools
from typing import Any

import numpy

from gpunet.backend import device as resolve_device

_creation = itertools.count()  # nodes run in the order they were made: a topological order by construction


class Value:
    """A symbolic array: its shape without the batch axis, its dtype, and the node that makes it
    (None for a gn.Input)."""

    def __init__(self, shape: tuple, dtype: str, node: "Node | None" = None, index: int = 0):
        self.shape, self.dtype, self.node, self.index = shape, dtype, node, index

    def __repr__(self) -> str:
        origin = "Input" if self.node is None else self.node.layer.describe().split("(")[0]
        return f"<symbolic value from {origin}: shape {(None, *self.shape)}, {self.dtype}>"

    def __array__(self, *args, **kwargs):
        raise TypeError(f"{self!r} is symbolic: it has no numbers until the model runs (gn.Model(...).forward)")


class Node:
    """One call of a layer on symbolic values: `many` when it was called with a list, `listed` when it gives a list."""

    def __init__(self, layer, inputs: list[Value], many: bool, outputs: list[tuple], listed: bool = False):
        self.layer, self.inputs, self.many, self.listed = layer, inputs, many, listed
        self.order = next(_creation)
        self.outputs = [Value(shape, dtype, self, i) for i, (shape, dtype) in enumerate(outputs)]


def Input(shape, dtype: str = "float32") -> Value:
    """A symbolic input of a graph model: `shape` without the batch axis, e.g. (784,) or (1, 28, 28)."""
    shape = (shape,) if isinstance(shape, int) else shape
    if not isinstance(shape, (tuple, list)) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                       for n in shape):
        raise ValueError(f"gn.Input: shape must be a tuple of positive ints (without the batch axis), got {shape!r}")
    try:
        kind = numpy.dtype(dtype)
    except TypeError:
        raise ValueError(f"gn.Input: dtype {dtype!r} is not a NumPy dtype") from None
    return Value(tuple(shape), str(kind))


def is_symbolic(x: Any) -> bool:
    if isinstance(x, (list, tuple)):
        return any(isinstance(item, Value) for item in x)
    return isinstance(x, Value)


def call_symbolic(layer, x) -> Any:
    """layer(x) on symbolic values: a new node; its output shape is checked now, by the layer itself."""
    many = isinstance(x, (list, tuple))
    inputs = list(x) if many else [x]
    if not inputs or not all(isinstance(v, Value) for v in inputs):
        raise TypeError(f"{layer.describe()}: called on a list mixing symbolic values and arrays; a graph model's "
                        "layers take symbolic values (gn.Input and layer outputs) only")
    if many and not layer.takes_list:
        raise TypeError(f"{_label(layer)} takes one input, got a list of {len(inputs)} symbolic values (merge them with "
                        "gn.layers.Add, Multiply or Concatenate first)")
    shapes, dtypes = [v.shape for v in inputs], [v.dtype for v in inputs]
    try:
        out = layer.output_shape(shapes if many else shapes[0], dtypes if many else dtypes[0])
    except (ValueError, TypeError, IndexError) as error:
        raise ValueError(f"{_label(layer)} cannot take {_origins(inputs)}: {error}") from None
    node = Node(layer, inputs, many, out if isinstance(out, list) else [out], listed=isinstance(out, list))
    return node.outputs if node.listed else node.outputs[0]


def probe_output(layer, shape, dtype):
    """Layer.output_shape's way: forward on zeros of batch 1, in eval mode (no running statistics move, no
    dropout draws), then every layer under it as it was (modes, saved state)."""
    xp = resolve_device(layer.device).xp
    many = isinstance(shape, list)
    x = [xp.zeros((1, *s), dtype=d) for s, d in zip(shape, dtype)] if many else xp.zeros((1, *shape), dtype=dtype)
    record, modes = layer.record(), [(each, each.training) for each in layer._subtree()]
    layer.eval()
    try:
        y = layer.forward(x)
    finally:
        for each, mode in modes:
            each.training = mode
        layer.restore(record)
    if isinstance(y, (list, tuple)):
        return [(tuple(a.shape[1:]), str(a.dtype)) for a in y]
    return tuple(y.shape[1:]), str(y.dtype)


def _label(layer) -> str:
    return f"layer {layer.name!r} ({layer.describe()})" if layer.name else layer.describe()


def _origins(inputs: list[Value]) -> str:
    def one(v: Value) -> str:
        where = "a gn.Input" if v.node is None else _label(v.node.layer)
        return f"the output of {where}, shape {(None, *v.shape)} {v.dtype}"
    return " and ".join(one(v) for v in inputs)


def default_names(layers: list) -> list[str]:
    """Each layer's name in a model: its own, or the class name in lower case, then _1, _2, ... (Keras's way),
    unique within the model, in the order the layers were first called."""
    taken: dict[str, Any] = {}
    for layer in layers:
        if layer.name is not None:
            if layer.name in taken:
                raise ValueError(f"gn.Model: two layers are named {layer.name!r} ({taken[layer.name].describe()} and "
                                 f"{layer.describe()}); names must be unique within a model")
            taken[layer.name] = layer
    names = []
    for layer in layers:
        name = layer.name
        if name is None:
            base = type(layer).__name__.lower()
            name = next(candidate for candidate in (base if k == 0 else f"{base}_{k}" for k in itertools.count())
                        if candidate not in taken)
            taken[name] = layer
        names.append(name)
    return names
