"""The parts of cupyx gpunet uses, for the CuPy stand-in."""
from __future__ import annotations

import numpy

import cupy._ndarray as device_memory
from cupy._ndarray import count, ndarray, record
from cupyx import scipy  # noqa: F401


def scatter_add(a, slices, value) -> None:
    """a[slices] += value with repeated indices accumulated (one atomicAdd kernel on a GPU)."""
    if not isinstance(a, ndarray):
        raise TypeError(f"scatter_add: a must be a cupy.ndarray, got {type(a).__name__}")
    index = slices._host if isinstance(slices, ndarray) else slices
    if isinstance(index, numpy.ndarray) and not isinstance(slices, ndarray):
        raise TypeError("scatter_add: Unsupported type <class 'numpy.ndarray'> for the indices")
    count("launches")
    values = value._host if isinstance(value, ndarray) else value
    if device_memory.CAPTURING is None:  # a capture runs nothing: the replay adds
        numpy.add.at(a._host, index, values)
    record(lambda: numpy.add.at(a._host, index, values))
