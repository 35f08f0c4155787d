"""RawModule / RawKernel for the stand-in: the source compiled by the kernel emulator, each call
marshalled exactly as CuPy marshals it, then launched through the emulator's generic entry point
(which enforces a real GPU's launch limits).

CuPy sends a Python int (bool included) as 8 bytes, a float as a double and a NumPy scalar as its
own type, without looking at the kernel; a GPU then reads whatever bytes it finds. The stand-in
reads the kernel's parameter list and refuses any argument whose size or kind does not match.
"""
from __future__ import annotations

import numpy

import cupy._ndarray as device_memory
from cupy._ndarray import count, ndarray, record
from cupy.cuda.compiler import CompileException

_NUMPY_SCALARS = {numpy.dtype(c).type for c in "?bhilqBHILQefdFD"}
_KINDS = {"int": "iu", "uint": "iu", "float": "f", "bool": "b?iu"}


def marshal(x):
    """("pointer", address) or ("scalar", numpy scalar), as cupy's _pointer() converts arguments.

    Refused although some CuPy accepts them, because what the kernel receives differs between
    CuPy versions (pyproject allows 13 and later): None (13 passes a NULL argument pointer, so the
    driver reads the argument from address 0; 14 passes a null pointer value) and a Python bool
    (8 bytes in 13, 1 byte in 14)."""
    if x is None:
        raise TypeError("None as a kernel argument: CuPy 13 and 14 pass different things; pass an array")
    if isinstance(x, bool):
        raise TypeError("a Python bool as a kernel argument: CuPy 13 sends 8 bytes, CuPy 14 one; pass numpy.int32")
    if isinstance(x, ndarray):
        return "pointer", x.data.ptr
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"Unsupported type {type(x)}: a host numpy.ndarray cannot be a kernel argument")
    if type(x) not in _NUMPY_SCALARS:
        if isinstance(x, int):
            x = numpy.int64(x)
        elif isinstance(x, float):
            x = numpy.float64(x)
        elif isinstance(x, complex):
            x = numpy.complex128(x)
        else:
            raise TypeError(f"Unsupported type {type(x)}")
    return "scalar", x


def _check(kernel: str, index: int, param, kind: str, value) -> bytes | int:
    where = f"kernel {kernel}, argument {index}"
    if param.kind == "pointer":
        if kind != "pointer":
            raise TypeError(f"{where}: the kernel takes a pointer, got a {value.dtype} scalar")
        return value
    if kind == "pointer":
        raise TypeError(f"{where}: the kernel takes a {param.size}-byte {param.kind}, got an array or None")
    dtype = value.dtype
    if dtype.itemsize != param.size or dtype.kind not in _KINDS[param.kind]:
        raise TypeError(f"{where}: the kernel takes a {param.size}-byte {param.kind}, got {dtype} "
                        f"({dtype.itemsize} bytes; CuPy sends Python ints and floats as 8 bytes: pass "
                        f"numpy.int32/numpy.float32)")
    return value.tobytes()


class RawKernel:
    """One kernel of a compiled module; calling it launches it (synchronously, here)."""

    def __init__(self, module, name: str):
        self._module, self.name = module, name
        self._info = module.kernels[name]

    def __call__(self, grid, block, args, *, shared_mem: int = 0, stream=None, enable_cooperative_groups=False):
        if not isinstance(args, tuple):
            raise TypeError(f"kernel {self.name}: args must be a tuple, got {type(args).__name__}")
        params = self._info.params
        if len(args) != len(params):
            raise TypeError(f"kernel {self.name} takes {len(params)} arguments, got {len(args)}")
        raw = [_check(self.name, i, p, *marshal(a)) for i, (p, a) in enumerate(zip(params, args))]
        if not isinstance(grid, tuple) or not isinstance(block, tuple):  # Function.__call__(tuple grid, tuple block, ...)
            raise TypeError(f"kernel {self.name}: grid and block must be tuples, got {grid!r} and {block!r}")
        if device_memory.CAPTURING is None:  # a capture runs nothing: its kernels run at each replay
            self._module.launch(self.name, grid, block, raw, shared_mem=int(shared_mem))
        count("launches")
        count("raw_launches")
        # (args: the replay keeps the arrays, and so the memory behind raw's pointers, alive)
        record(lambda args=args: self._module.launch(self.name, grid, block, raw, shared_mem=int(shared_mem)))

    @property
    def attributes(self) -> dict:
        registers, shared = (self._module.resources or {}).get(self.name, (0, 0))
        return {"num_regs": registers, "shared_size_bytes": shared, "max_threads_per_block": 1024}


class RawModule:
    def __init__(self, code: str | None = None, *, path: str | None = None, options=(), backend="nvrtc",
                 translate_cucomplex=False, jitify=False, name_expressions=None):
        if code is None and path is None:
            raise TypeError("RawModule needs code or path")
        self.code = code if code is not None else open(path, encoding="utf-8").read()
        self.options = tuple(options)
        self._module = None

    def compile(self, log_stream=None):
        if self._module is None:
            from tests.cuda.emulator import build  # the emulator lives beside the stand-in in tests/

            try:
                self._module = build(self.code, name="rawmodule",
                                     defines=[o for o in self.options if o.startswith("-D")])
            except RuntimeError as exc:
                raise CompileException(str(exc)) from None
        return self

    def get_function(self, name: str) -> RawKernel:
        self.compile()
        if name not in self._module.kernels:
            raise RuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found ({name})")
        return RawKernel(self._module, name)
