"""The arrays a user hands to fit, evaluate and model.predict: NumPy (or CuPy) arrays are taken as
they are; Python lists and tuples (nested, of numbers) are converted by one dtype rule, as Keras
converts them; anything else, a ragged list or one holding something other than numbers, is
refused in one line naming where.

The dtype rule for lists: floats (and bools) take the model's float dtype (float32 unless its
parameters are float64); integers stay integers (int64) where they are ids or labels (the targets
of softmax_cross_entropy, the inputs of a model whose preprocessing takes raw pixels or character
ids), and take the model's float dtype elsewhere.
"""
from __future__ import annotations

import numbers

import numpy

from gpunet.backend import is_cupy_array
from gpunet.losses import metric

IMAGE_DIMS = "(N, H, W), (N, C, H, W) or (N, features)"


def float_dtype(model) -> numpy.dtype:
    """The dtype of the model's parameters when it is floating point (float32 without any)."""
    for value in model.params.values():
        if numpy.dtype(value.dtype).kind == "f":
            return numpy.dtype(value.dtype)
    return numpy.dtype("float32")


def inputs(model, value, where: str):
    """value as the model's inputs (see the module's dtype rule): one array, or for a gn.Model with several
    inputs a list of them, one per input in the order of its inputs, with as many samples each."""
    count, specs = input_count(model), getattr(model, "preprocess", None)
    if count is None:
        return _convert(value, where, "inputs", float_dtype(model), _raw(specs))
    if not isinstance(value, (list, tuple)) or len(value) != count:
        got = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else f"one {type(value).__name__}"
        raise ValueError(f"{where}: the model takes {count} inputs; give a list of {count} arrays (in the order of its "
                         f"inputs), got {got}")
    specs = specs if isinstance(specs, list) else [None] * count
    return same_length([_convert(v, f"{where}: input {i}", "inputs", float_dtype(model), _raw(spec))
                        for i, (v, spec) in enumerate(zip(value, specs))], where, "input")


def targets(model, value, where: str, loss):
    """value as targets of `loss`: whole numbers stay int64 class ids for a loss that implies accuracy. With
    a list of losses (a model with several outputs), a list of targets, one per output."""
    if not isinstance(loss, (list, tuple)):
        return _convert(value, where, "targets", float_dtype(model), metric(loss) == "accuracy")
    if not isinstance(value, (list, tuple)) or len(value) != len(loss):
        got = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else f"one {type(value).__name__}"
        raise ValueError(f"{where}: the model has {len(loss)} outputs (one loss each); give a list of {len(loss)} "
                         f"target arrays, got {got}")
    return same_length([_convert(v, f"{where}: targets {i}", "targets", float_dtype(model), metric(name) == "accuracy")
                        for i, (v, name) in enumerate(zip(value, loss))], where, "targets")


def check_losses(model, loss, where: str) -> None:
    """One loss per output: a list of them for a gn.Model with several outputs, one name otherwise."""
    several = getattr(model, "several_outputs", False)
    count = len(model.output_shapes(1)) if several else 1
    if several != isinstance(loss, (list, tuple)) or (several and len(loss) != count):
        given = f"a list of {len(loss)} losses" if isinstance(loss, (list, tuple)) else f"one loss ({loss!r})"
        raise ValueError(f"{where}: the model has {count} output{'s' if count > 1 else ''}, and loss is {given}; give "
                         + ("a list of one loss per output (loss=[...])" if several else "one loss name"))


def input_count(model) -> int | None:
    """How many input arrays the model takes as a list (a gn.Model with several inputs), or None: one array."""
    return len(model.input_shapes) if getattr(model, "several_inputs", False) else None


def same_length(arrays: list, where: str, what: str) -> list:
    for i, a in enumerate(arrays[1:], 1):
        if len(a) != len(arrays[0]):
            raise ValueError(f"{where}: {what} {i} has {len(a)} samples but {what} 0 has {len(arrays[0])}")
    return arrays


def take(x, index):
    """Rows `index` of an array, or of each array of a list (several inputs or targets)."""
    return [a[index] for a in x] if isinstance(x, list) else x[index]


def each(function, x):
    """function of an array, or of each array of a list."""
    return [function(a) for a in x] if isinstance(x, list) else function(x)


def samples(x) -> int:
    return len(x[0]) if isinstance(x, list) else len(x)


def _raw(spec) -> bool:
    """Whether a preprocessing spec takes raw integers (pixels or character ids) that must stay integers."""
    return isinstance(spec, dict) and spec.get("kind") in ("image", "text")


def image_dims(x, where: str) -> None:
    """Refuse images whose array has fewer than 2 or more than 4 dimensions (with the batch axis)."""
    if not 2 <= x.ndim <= 4:
        raise ValueError(f"{where}: images must be an array {IMAGE_DIMS}, got shape {tuple(x.shape)} "
                         f"({x.ndim} dimension{'' if x.ndim == 1 else 's'})")


def _convert(value, where: str, what: str, floats: numpy.dtype, keep_ints: bool):
    if isinstance(value, numpy.ndarray) or is_cupy_array(value):
        return value  # the caller's own array and dtype
    if hasattr(value, "__array__"):  # a tensor or data frame of another library, in its own dtype
        return numpy.asarray(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: {what} must be an array or a list of samples, got {_kind(value)}")
    if value and all(isinstance(v, numpy.ndarray) for v in value):
        raise ValueError(f"{where}: {what} is a list of {len(value)} arrays, for a model that takes one array (a "
                         "gn.Model with several inputs or outputs takes lists); give one array (numpy.stack)")
    try:
        array = numpy.asarray(value)
    except ValueError:  # NumPy: "inhomogeneous shape"; say where
        _ragged(value, where, what, ())
        raise
    if array.dtype.kind not in "biuf":
        _not_numbers(value, where, what, ())
        raise ValueError(f"{where}: {what} must hold real numbers, got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{where}: {what} must be a list of samples, got an empty or scalar value")
    if array.dtype.kind in "iu" and keep_ints:
        return array.astype("int64")
    return array.astype(floats)


def _shape(value) -> tuple:
    return (len(value), *_shape(value[0])) if isinstance(value, (list, tuple)) and value else \
        ((0,) if isinstance(value, (list, tuple)) else numpy.shape(value))


def _ragged(value, where: str, what: str, index: tuple) -> None:
    """Raise naming the first item whose shape differs from its first sibling's (depth first)."""
    if not isinstance(value, (list, tuple)) or not value:
        return
    first = _shape(value[0])
    for i, item in enumerate(value):
        if _shape(item) != first:
            raise ValueError(f"{where}: {what} is a ragged list: item {_at(index + (0,))} has shape {first} but "
                             f"item {_at(index + (i,))} has shape {_shape(item)}; every sample must have the same "
                             "shape")
    for i, item in enumerate(value):
        _ragged(item, where, what, index + (i,))


def _not_numbers(value, where: str, what: str, index: tuple) -> None:
    """Raise naming the first item that is not a real number (depth first)."""
    if isinstance(value, (list, tuple, numpy.ndarray)):
        for i, item in enumerate(value):
            _not_numbers(item, where, what, index + (i,))
    elif isinstance(value, numpy.generic) and value.dtype.kind in "biuf":
        return
    elif isinstance(value, (bool, numbers.Real)) and not isinstance(value, numpy.generic):
        return
    else:
        raise ValueError(f"{where}: {what} must hold numbers, found {_kind(value)} at index {_at(index)}")


def _at(index: tuple) -> str:
    return str(index[0]) if len(index) == 1 else str(index)


def _kind(value) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 30 else text[:27] + '...'}"
