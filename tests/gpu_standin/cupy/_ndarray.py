"""The stand-in's device array: NumPy memory behind CuPy's rules.

What gpunet could get away with on NumPy but not on CuPy fails here as it does on a GPU:
implicit conversion to a NumPy array is a TypeError, mixing device and host arrays in an op is
a TypeError, reductions give 0-d device arrays, and only `.get()`, `float()` and friends move
data to the host. Every op that would be a CuPy kernel (or a cuBLAS call) on a GPU counts one
launch; every host<->device copy counts one transfer (COUNTERS, read by tests).

16-bit floats are CuPy 14's: float16 and ml_dtypes.bfloat16 arrays (CuPy 14.2 has bfloat16 loops for
its arithmetic ufuncs: cupy#9494), with their reductions in float32 and bfloat16 refused where
CuPy has no loop for it (_REDUCED_IN_FLOAT, _NO_BFLOAT16_LOOP below).
"""
from __future__ import annotations

import mmap

import numpy
from numpy.lib.mixins import NDArrayOperatorsMixin

from cupy.cuda import memory

COUNTERS = {"launches": 0, "raw_launches": 0, "d2h": 0, "h2d": 0, "graph_launches": 0}
IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. "
                       "Please use `.get()` to construct a NumPy array explicitly.")


# A host-to-device copy of host data inside a capture: real CuPy records it (cupy.asarray copies
# through a pinned staging buffer with an async copy, and a 0-d value becomes a fill kernel with
# the value frozen into the graph), so a replay reads the staging buffer as it was at capture:
# stale data, silently. The stand-in is deliberately stricter and refuses it, unless
# RECORD_HOST_COPIES (tests.gpu_standin.cupy_faithful_capture()) asks for CuPy's behaviour.
RECORD_HOST_COPIES = False


def count(kind: str, n: int = 1, staged: bool = False) -> None:
    """Count a launch or a transfer. staged: an h2d copy CuPy makes from a staging buffer of its own
    (recordable in a capture); the others (.get(), .set() from pageable memory) are synchronous,
    and CUDA refuses them while a stream captures."""
    if CAPTURING is not None and kind in ("d2h", "h2d") and not (staged and RECORD_HOST_COPIES):
        raise RuntimeError(f"cudaErrorStreamCaptureUnsupported: a {'device-to-host' if kind == 'd2h' else 'host-to-device'}"
                           " copy while a stream is capturing a graph")
    COUNTERS[kind] += n


# Stream capture (cupy.cuda.Stream.begin_capture): while the list is set, every kernel records how
# to run again on the same memory, reading its inputs then, and runs nothing that writes memory
# that existed before it, as on a GPU, where a capture runs nothing at all (an op that makes a new
# array computes it, here, only so that its shape and dtype are known; its values are garbage on
# a GPU until a replay). A graph replays the list; the arrays it references stay alive with it, as
# the graph's memory does on a GPU.
CAPTURING: list | None = None
_WRITES_ITS_ARGUMENTS = {"copyto", "put", "place", "putmask", "fill_diagonal", "at"}  # (a ufunc's .at)


def record(replay) -> None:
    """Add a kernel's replay to the capture in progress (if any)."""
    if CAPTURING is not None:
        CAPTURING.append(replay)


def refill(target, fresh) -> None:
    """Write a recomputed result into the memory of the device array(s) made at capture time."""
    if isinstance(target, tuple):
        for t, f in zip(target, fresh):
            refill(t, f)
    elif isinstance(target, ndarray):
        numpy.copyto(target._host, fresh, casting="unsafe")


def check_dtype(dtype: numpy.dtype) -> None:
    """CuPy 14 holds bfloat16 arrays as ml_dtypes.bfloat16 (cupy#9494, "experimental"); of ml_dtypes' other
    types (float8_*, int4...) it has none: the stand-in refuses their arrays (deliberately stricter:
    CuPy may make one, but no kernel of it compiles)."""
    if dtype.type.__module__.startswith("ml_dtypes") and dtype.name != "bfloat16":
        raise TypeError(f"CuPy 14 supports no {dtype.name} arrays (of ml_dtypes' types, only bfloat16)")


def is_bfloat16(dtype: numpy.dtype) -> bool:
    return dtype.name == "bfloat16" and dtype.type.__module__.startswith("ml_dtypes")


def guarded_empty(shape, dtype, order="C") -> numpy.ndarray:
    """Device memory from the current allocator (cupy.cuda.memory: it ends at a guard page)."""
    dtype = numpy.dtype(dtype)
    check_dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, numpy.integer)) else tuple(shape)
    pointer = memory.alloc(int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize)
    return numpy.ndarray(shape, dtype, buffer=pointer.mem.buffer, offset=pointer.mem.offset, order=order)


def _in_device_memory(host: numpy.ndarray) -> bool:
    root = host
    while isinstance(root, numpy.ndarray) and root.base is not None:
        root = root.base
    return isinstance(root, mmap.mmap)


def _to_device_memory(host: numpy.ndarray) -> numpy.ndarray:
    """host itself when it lives in (is a view of) device memory, else a guarded copy of it."""
    if _in_device_memory(host):
        return host
    order = "F" if host.flags.f_contiguous and not host.flags.c_contiguous else "C"
    device = guarded_empty(host.shape, host.dtype, order)
    device[...] = host
    return device


class _Flags:
    def __init__(self, host: numpy.ndarray):
        self.c_contiguous = host.flags.c_contiguous
        self.f_contiguous = host.flags.f_contiguous
        self.owndata = host.base is None

    def __getitem__(self, name: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[name]


class _MemoryPointer:
    def __init__(self, host: numpy.ndarray):
        self.ptr = host.ctypes.data


class ndarray(NDArrayOperatorsMixin):
    """A device array; `_host` is the emulated device memory (never handed out uncopied)."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the CuPy stand-in makes arrays from a shape and dtype only")
        self._host = guarded_empty(shape, dtype, order)

    @classmethod
    def _wrap(cls, host: numpy.ndarray) -> "ndarray":
        if host.dtype.num >= 256:  # a user-defined dtype (ml_dtypes'), a view of device memory as one too
            check_dtype(host.dtype)
        out = cls.__new__(cls)
        out._host = _to_device_memory(host)
        return out

    # --- attributes ---------------------------------------------------------------------
    shape = property(lambda self: self._host.shape)
    dtype = property(lambda self: self._host.dtype)
    size = property(lambda self: self._host.size)
    ndim = property(lambda self: self._host.ndim)
    strides = property(lambda self: self._host.strides)
    itemsize = property(lambda self: self._host.itemsize)
    nbytes = property(lambda self: self._host.nbytes)
    flags = property(lambda self: _Flags(self._host))
    data = property(lambda self: _MemoryPointer(self._host))
    T = property(lambda self: ndarray._wrap(self._host.T))
    base = property(lambda self: None if self._host.base is None else ndarray._wrap(self._host.base))

    # --- host transfers: the only ways out --------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(IMPLICIT_CONVERSION)

    def get(self, stream=None, order="C", out=None, blocking=True) -> numpy.ndarray:
        count("d2h")
        if out is not None:
            numpy.copyto(out, self._host)
            return out
        return numpy.array(self._host, order=order, copy=True)

    def set(self, arr, stream=None) -> None:
        """As CuPy 14's (cupy/_core/core.pyx): same dtype and shape or an error, no cast, no broadcast."""
        if not isinstance(arr, numpy.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not (self._host.flags.c_contiguous or self._host.flags.f_contiguous):
            raise RuntimeError("Cannot set to non-contiguous array")
        count("h2d")
        self._host[...] = arr

    def _scalar(self):
        if self.size != 1:
            raise TypeError("only size-1 arrays can be converted to Python scalars")
        count("d2h")
        return self._host.reshape(()).item()

    def item(self):
        return self._scalar()

    def tolist(self):
        count("d2h")
        return self._host.tolist()

    def __float__(self):
        return float(self._scalar())

    def __int__(self):
        return int(self._scalar())

    def __complex__(self):
        return complex(self._scalar())

    def __bool__(self):
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return bool(self._scalar())

    def __len__(self):
        return len(self._host)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"<cupy stand-in ndarray shape={self.shape} dtype={self.dtype}>"

    # --- views (no launch) and copies (one launch) ------------------------------------------
    def reshape(self, *shape, order="C"):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _view_or_copy(self._host.reshape(shape, order=order), self._host,
                              lambda: self._host.reshape(shape, order=order))

    def ravel(self, order="C"):
        return _view_or_copy(self._host.ravel(order=order), self._host, lambda: self._host.ravel(order=order))

    def transpose(self, *axes):
        return ndarray._wrap(self._host.transpose(*axes))

    def swapaxes(self, a, b):
        return ndarray._wrap(self._host.swapaxes(a, b))

    def squeeze(self, axis=None):
        return ndarray._wrap(self._host.squeeze(axis))

    def view(self, dtype=None):
        return ndarray._wrap(self._host.view(dtype) if dtype is not None else self._host.view())

    def copy(self, order="C"):
        count("launches")
        result = ndarray._wrap(self._host.copy(order=order))
        record(lambda: numpy.copyto(result._host, self._host))
        return result

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and numpy.dtype(dtype) == self.dtype:
            return self
        count("launches")
        result = ndarray._wrap(self._host.astype(dtype, order=order))
        record(lambda: numpy.copyto(result._host, self._host, casting="unsafe"))
        return result

    def fill(self, value) -> None:
        count("launches")
        if CAPTURING is None:
            self._host.fill(value)
        record(lambda: self._host.fill(value))

    def __getitem__(self, key):
        key = _unwrap_index(key)
        result = self._host[key]
        if not isinstance(result, numpy.ndarray):  # one element: still a 0-d device array
            count("launches")
            element = ndarray._wrap(numpy.asarray(result))
            record(lambda: numpy.copyto(element._host, self._host[key]))
            return element
        return _view_or_copy(result, self._host, lambda: self._host[key])

    def __setitem__(self, key, value):
        count("launches")
        key, value = _unwrap_index(key), _operand(value, "__setitem__")
        if CAPTURING is None:
            self._host[key] = value
        record(lambda: self._host.__setitem__(key, value))

    # --- everything else: NumPy's implementation on the device memory -----------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return call_numpy(getattr(ufunc, method), inputs, kwargs, name=f"{ufunc.__name__}.{method}")

    def __array_function__(self, func, types, args, kwargs):
        return call_numpy(func, args, kwargs, name=func.__name__)


def _reduction(name):
    def method(self, *args, **kwargs):
        return call_numpy(getattr(numpy, name), (self, *args), kwargs, name=name)

    method.__name__ = name
    return method


for _name in ("sum", "mean", "max", "min", "argmax", "argmin", "any", "all", "var", "std", "prod", "cumsum",
              "clip", "dot", "nonzero", "round", "conj", "repeat", "take", "trace", "diagonal"):
    setattr(ndarray, _name, _reduction(_name))
ndarray.__module__ = "cupy"  # gpunet's dispatch tells devices apart by the array type's module


def _view_or_copy(result: numpy.ndarray, source: numpy.ndarray, compute) -> ndarray:
    """A view stays a view; a copy is a kernel (compute makes it again, for a replay)."""
    wrapped = ndarray._wrap(result)
    if not numpy.shares_memory(result, source):
        count("launches")
        record(lambda: refill(wrapped, compute()))
    return wrapped


def _unwrap_index(key):
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._host
    if isinstance(key, (numpy.ndarray, list)):  # CuPy copies host index arrays to the device (cupy.asarray)
        count("h2d", staged=True)
    return key


def _operand(x, name: str):
    """The device memory of an operand; host arrays are refused as CuPy refuses them."""
    if isinstance(x, ndarray):
        return x._host
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"{name}: Unsupported type <class 'numpy.ndarray'> (a host array given to a CuPy op)")
    if isinstance(x, (list, tuple)):
        return type(x)(_operand(v, name) for v in x)
    if isinstance(x, dict):
        return {k: _operand(v, name) for k, v in x.items()}
    return x


_CUBLAS_PRODUCTS = {"matmul", "dot", "tensordot"}  # CuPy's tensordot_core: cuBLAS, under the compute type

# 16-bit floats (float16, ml_dtypes.bfloat16). CuPy 14.2's sum and prod reduce them in float ('float' is
# the reduction type of their e->e and bfloat16 loops) and so does its mean; NumPy adds float16 in float16
# along an axis and ml_dtypes adds bfloat16 in bfloat16 (4096 ones sum to 256): here these reductions
# run in float32 and round once, as CuPy's do.
_REDUCED_IN_FLOAT = {"sum", "prod", "nansum", "nanprod", "mean", "nanmean"}
# CuPy 14.2's ufuncs with a float16 loop but no bfloat16 one (their `types`; cupy#9630 lists rounding
# as missing): given bfloat16, CuPy computes them in another type. The stand-in refuses bfloat16 there
# (deliberately stricter): a kernel should cast explicitly.
_NO_BFLOAT16_LOOP = {"divmod", "logical_not", "logical_xor", "clip", "round", "around"}


def _under_compute_type(func):
    """func (a product) with its float32 inputs rounded to TF32 when cupy._core's compute type
    for float32 is COMPUTE_TYPE_TF32, as cuBLAS rounds them (decided at each call: a replay too)."""
    def product(*args, **kwargs):
        from cupy._core import _routines_linalg as linalg  # (cupy._core imports this module)

        arrays = [a for a in args if isinstance(a, numpy.ndarray)]
        if (arrays and all(a.dtype == numpy.float32 for a in arrays)
                and linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_TF32):
            args = tuple(linalg.tf32(a) if isinstance(a, numpy.ndarray) else a for a in args)
        return func(*args, **kwargs)

    return product


def call_numpy(func, args, kwargs, name: str):
    """Run NumPy's `func` on device memory; results become device arrays (`out=` ones stay theirs)."""
    base = name.partition(".")[0]
    if base in _CUBLAS_PRODUCTS:
        func = _under_compute_type(func)
    outs = kwargs.get("out")
    host_args = _operand(list(args), name)
    host_kwargs = _operand(dict(kwargs), name)
    sources = [a for a in _flatten(host_args) if isinstance(a, numpy.ndarray)]
    if base in _NO_BFLOAT16_LOOP and any(is_bfloat16(a.dtype) for a in sources):
        raise TypeError(f"{base}: CuPy 14.2 has no bfloat16 loop for it (it would compute in another type); "
                        "the stand-in refuses it: cast to float32 first")
    if (base in _REDUCED_IN_FLOAT and len(host_args) <= 2 and "dtype" not in host_kwargs and outs is None
            and sources and sources[0] is host_args[0]
            and (sources[0].dtype == numpy.float16 or is_bfloat16(sources[0].dtype))):
        func = _reduced_in_float32(func, sources[0].dtype)
    if CAPTURING is not None and (outs is not None or name.rpartition(".")[2] in _WRITES_ITS_ARGUMENTS):
        count("launches")  # it writes memory that exists already: a capture only records it
        record(lambda: func(*host_args, **host_kwargs))
        if outs is None:
            return None
        return (outs[0] if len(outs) == 1 else outs) if isinstance(outs, tuple) else outs
    result = func(*host_args, **host_kwargs)
    if outs is not None:
        count("launches")
        record(lambda: func(*host_args, **host_kwargs))
        if isinstance(outs, tuple):
            return outs[0] if len(outs) == 1 else outs
        return outs
    wrapped = _wrap_result(result, sources)
    record(lambda: refill(wrapped, func(*host_args, **host_kwargs)))  # (a view's refill writes it over itself)
    return wrapped


def _reduced_in_float32(func, dtype):
    """func (a reduction of a 16-bit array) computed in float32, its result rounded once to dtype."""
    def reduction(*args, **kwargs):
        return numpy.asarray(func(*args, dtype=numpy.float32, **kwargs)).astype(dtype)

    return reduction


def _wrap_result(result, sources):
    if isinstance(result, tuple):
        return tuple(_wrap_result(r, sources) for r in result)
    if isinstance(result, numpy.ndarray):
        if any(numpy.shares_memory(result, s) for s in sources):
            return ndarray._wrap(result)  # a view: no kernel on a GPU either
        count("launches")
        return ndarray._wrap(result)
    if isinstance(result, numpy.generic):
        count("launches")
        return ndarray._wrap(numpy.asarray(result))
    if result is None:  # copyto, ufunc.at: run for their effect on a device array
        count("launches")
    return result  # shapes and other host facts: no kernel


def _flatten(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item
