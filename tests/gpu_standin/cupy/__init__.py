"""A CuPy stand-in for the test suite, importable as `cupy` where no real GPU is usable.

Arrays are NumPy memory behind CuPy's rules (_ndarray.py); `RawModule` compiles gpunet's .cu
sources with the kernel emulator and launches them with CuPy's argument marshalling and a real
GPU's launch limits (_raw.py). Module-level NumPy functions work on device arrays and return
device arrays; host arrays are refused. tests/gpu_standin/__init__.py decides when it is used.
It is held to CuPy 14.2's source (issue 27): the version, cupy.cuda.using_allocator,
ndarray.set, cupy._core's compute type (TF32 products), cupyx.distributed and what a stream
capture records; where it is deliberately stricter, the docstring of the part says so.
16-bit floats: float16 (cupy.float16) and ml_dtypes.bfloat16 arrays, as CuPy 14.2 has them: it has
no cupy.bfloat16 (the dtype is ml_dtypes', which CuPy imports when installed; cupy#9494).
"""
from __future__ import annotations

import numpy

from cupy import cuda  # noqa: F401  (cupy.cuda is an attribute of the real module too)
from cupy import _core  # noqa: F401  (the compute type of products: _core.set_compute_type)
from cupy._ndarray import COUNTERS, ndarray, call_numpy, count, record, refill
from cupy._raw import RawKernel, RawModule

__version__ = "14.2.0+gpunet.standin"  # gpunet requires CuPy 14
STANDIN = True  # how a test tells the stand-in from the real CuPy

# NumPy names that are not functions of arrays: dtypes, constants, helpers that make no array.
_PASSTHROUGH = {"dtype", "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                "uint32", "uint64", "bool_", "complex64", "complex128", "inf", "nan", "pi", "e", "newaxis",
                "integer", "floating", "number", "generic", "isscalar", "result_type", "promote_types",
                "can_cast", "iinfo", "finfo", "ndim", "shape", "broadcast_shapes"}
_NOT_PROVIDED = {"random", "linalg", "fft", "testing", "save", "load", "fromfile", "frombuffer", "loadtxt"}


def _creation(name):
    numpy_function = getattr(numpy, name)
    launches = name not in ("empty",)  # empty allocates; zeros, ones, full, arange, ... run a kernel

    def make(*args, **kwargs):
        result = ndarray._wrap(numpy_function(*args, **kwargs))
        if launches:
            count("launches")
            record(lambda: refill(result, numpy_function(*args, **kwargs)))
        return result

    make.__name__ = name
    return make


empty, zeros, ones, full, arange, linspace, eye, identity = (
    _creation(n) for n in ("empty", "zeros", "ones", "full", "arange", "linspace", "eye", "identity"))


def empty_like(a, dtype=None, order="K", shape=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"empty_like: Unsupported type {type(a)}")
    return ndarray._wrap(numpy.empty_like(a._host, dtype=dtype, order=order, shape=shape))


def asarray(a, dtype=None, order=None, blocking=False):
    """Device arrays pass through (converted if dtype says so); host data is copied to the device."""
    if isinstance(a, ndarray):
        return a if dtype is None or numpy.dtype(dtype) == a.dtype else a.astype(dtype)
    return _from_host(numpy.array(a, dtype=dtype, order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K", ndmin=0, blocking=False):
    if isinstance(a, ndarray):
        return a.astype(dtype or a.dtype, copy=True)
    return _from_host(numpy.array(a, dtype=dtype, order=order, ndmin=ndmin, copy=True))


def _from_host(staging: numpy.ndarray) -> ndarray:
    """As CuPy 14's _array_default: host data goes into a (pinned) staging buffer, here `staging`,
    and an async copy takes it to the device; a 0-d value is a fill kernel instead. In a capture
    (where the stand-in allows it: RECORD_HOST_COPIES) a replay copies the staging buffer as it was
    at capture, and fills the frozen value."""
    count("h2d", staged=True)
    result = ndarray._wrap(staging)
    if staging.ndim == 0:
        value = staging[()]
        record(lambda: result._host.fill(value))
    else:
        record(lambda: numpy.copyto(result._host, staging))
    return result


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):  # CuPy's takes device arrays only: no silent host-to-device copy
        raise TypeError(f"ascontiguousarray: Unsupported type {type(a)}")
    if a.flags.c_contiguous and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a
    count("launches")
    result = ndarray._wrap(numpy.ascontiguousarray(a._host, dtype=dtype))
    record(lambda: refill(result, a._host))
    return result


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    return a.get(out=out) if isinstance(a, ndarray) else numpy.asarray(a, order=order)


def get_array_module(*args):
    return __import__(__name__) if any(isinstance(a, ndarray) for a in args) else numpy


class DeviceUfunc:
    """A NumPy ufunc as a CuPy ufunc: device arrays in, device arrays out; a host array is refused
    (without this wrapper, cupy.exp(host_array) would quietly return a NumPy array)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def _refuse_host(self, args):
        if not any(isinstance(a, ndarray) for a in args):
            raise TypeError(f"{self.__name__}: Unsupported type: no cupy.ndarray among the arguments")

    def __call__(self, *args, **kwargs):
        self._refuse_host(args)
        return call_numpy(self._ufunc, args, kwargs, name=self.__name__)

    def __getattr__(self, method):  # at, reduce, accumulate, outer
        numpy_method = getattr(self._ufunc, method)
        if not callable(numpy_method):
            return numpy_method

        def device_method(*args, **kwargs):
            self._refuse_host(args)
            return call_numpy(numpy_method, args, kwargs, name=f"{self.__name__}.{method}")

        return device_method


def __getattr__(name: str):
    if name in _PASSTHROUGH:
        return getattr(numpy, name)
    if name == "bfloat16":
        raise AttributeError("module 'cupy' has no attribute 'bfloat16' (CuPy 14 takes ml_dtypes.bfloat16 as the dtype)")
    if name in _NOT_PROVIDED or name.startswith("_"):
        raise AttributeError(f"the CuPy stand-in has no cupy.{name}")
    attribute = getattr(numpy, name, None)
    if isinstance(attribute, numpy.ufunc):
        return DeviceUfunc(attribute)
    if callable(attribute) and not isinstance(attribute, type):
        def device_function(*args, **kwargs):
            return call_numpy(attribute, args, kwargs, name=name)

        device_function.__name__ = name
        return device_function
    raise AttributeError(f"the CuPy stand-in has no cupy.{name}")


__all__ = ["COUNTERS", "RawKernel", "RawModule", "ndarray", "asarray", "asnumpy", "cuda"]
