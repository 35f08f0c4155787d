"""The array decides: NumPy inputs run on NumpyOps, CuPy inputs on CupyOps."""
from __future__ import annotations

import functools
from typing import Any, TypeAlias

import numpy

from gpunet.backend.devices import cupy_status, gpu_status

# A numpy.ndarray or a cupy.ndarray (CuPy ships no type hints, so the alias cannot name it)
Array: TypeAlias = Any


def is_cupy_array(a) -> bool:
    # Look at the type's module instead of importing cupy: dispatch must not import it.
    return type(a).__module__.startswith("cupy")


@functools.lru_cache(maxsize=None)
def ops_for_device(name: str):
    if name == "cpu":
        from gpunet.backend.numpy_ops import NumpyOps
        return NumpyOps()
    usable, why = gpu_status()
    if not usable:
        raise RuntimeError(f"the GPU backend is unusable: {why}")
    from gpunet.backend.cupy_ops import CupyOps
    return CupyOps()


def ops_for(*arrays, op: str = "op"):
    """The Ops of the device the arrays live on; mixing NumPy and CuPy arrays is a TypeError."""
    for a in arrays:  # fast path, the common case on the CPU: every input a NumPy array
        if type(a) is not numpy.ndarray:
            break
    else:
        return ops_for_device("cpu")
    on_gpu = None
    first_type = None
    for a in arrays:
        if a is None or numpy.isscalar(a):
            continue
        gpu = is_cupy_array(a)
        if on_gpu is None:
            on_gpu, first_type = gpu, type(a)
        elif gpu != on_gpu:
            raise TypeError(
                f"{op}: inputs live on different devices ({_type_name(first_type)} and "
                f"{_type_name(type(a))}); move them to one device with .to(...) or gn.to_numpy(...)"
            )
    return ops_for_device("gpu" if on_gpu else "cpu")


def _type_name(t) -> str:
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


def to_numpy(a) -> numpy.ndarray:
    """The array on the host as numpy.ndarray: for a CuPy array a new host copy, for a NumPy
    array the array itself (no copy: later in-place writes show through; numpy.array(...) copies),
    for anything else numpy.asarray's conversion."""
    if is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)


def to_device(a, device_name: str):
    """Move an array to "cpu" or "gpu" (no copy when it is already there)."""
    if device_name == "cpu":
        return to_numpy(a)
    cupy = cupy_status()[0]
    if cupy is None:
        raise RuntimeError("cannot move an array to the GPU: CuPy is not installed")
    return cupy.asarray(a)
