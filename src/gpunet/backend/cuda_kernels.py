"""gpunet's CUDA kernels: the sources in gpunet/kernels/*.cu (one file per family), the constants
they are compiled with, their compilation (NVRTC through cupy.RawModule, on first use, cached
for the process; CuPy also caches the binaries on disk) and the one launch path. A source that
does not compile raises one KernelCompileError naming the file.

Each compile-time constant is defined once, below, and reaches every compiler as -DNAME=value
(DEFINE_FLAGS): NVRTC here, nvcc and the kernel emulator in the tests. A .cu file holds a
fallback under #ifndef, equal to the value here (a test checks), so that it compiles alone; the flags
are part of what a family's compiled code depends on (compile_inputs), which keys the
GEMM-choice cache. The kernels themselves are called through the typed wrappers of
cuda_wrappers.py, one per kernel.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy

from gpunet.backend import activations
from gpunet.backend.devices import cupy_status

THREADS = 256  # threads per block of every kernel; the block reductions size their scratch by it
TILE_M = 64  # rows of C per block of gemm_bias_act (16 x 16 threads, each a 4 x 4 block of C)
TILE_N = 64  # columns of C per block of gemm_bias_act
TILE_K = 16  # depth of the A and W tiles gemm_bias_act stages in shared memory
ROWS_PER_CHUNK = 64  # rows summed by one block of bias_act_backward
ACTIVATION_CODES = {None: 0, **{a.name: a.code for a in activations.TABLE.values()}}  # codes of gemm.cu

DEFINES = {"THREADS": THREADS, "TILE_M": TILE_M, "TILE_N": TILE_N, "TILE_K": TILE_K, "ROWS_PER_CHUNK": ROWS_PER_CHUNK,
           **{f"ACT_{(name or 'none').upper()}": code for name, code in ACTIVATION_CODES.items()}}
DEFINE_FLAGS = tuple(f"-D{name}={value}" for name, value in DEFINES.items())
NVRTC_OPTIONS = ("--std=c++17", *DEFINE_FLAGS)

MAX_BLOCKS = 65536  # grid-stride kernels cover any size with at most this many blocks
# gridDim.y (and z) is at most 65,535 on every CUDA GPU; kernels with a 2-D grid loop over the
# row tiles beyond it (grid-stride in y), so every launch caps y through grid_2d() below.
MAX_GRID_Y = 65535


class KernelCompileError(RuntimeError):
    """NVRTC rejected one of gpunet's kernel sources."""


# kernels/ sits at the repository root and is installed as the package gpunet.kernels; running
# from a source tree (PYTHONPATH=src, as on a machine without a package index) reads it there.
SOURCE_TREE_KERNELS = Path(__file__).resolve().parents[3] / "kernels"


# A kernel source's line `#include "NAME.cuh"`: a header of kernels/ (common.cuh, the shared device helpers).
_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"[^\n]*$', flags=re.M)


def source(family: str) -> str:
    """The text of kernels/<family>.cu with each of its headers' text in place of its #include line.

    NVRTC could find the header with -I<kernels folder> instead, but the text itself is what CuPy keys
    its on-disk kernel cache by (a changed header behind an unchanged .cu would load the old binary),
    what compile_inputs hashes for the GEMM-choice cache, and the installed kernels may not be a folder
    on disk (importlib.resources). #line keeps NVRTC's messages at the header's and the file's own lines.
    """
    folder = _kernels_folder()
    text = _read(folder, f"{family}.cu")

    def header(match) -> str:
        name = match.group(1)
        after = text.count("\n", 0, match.end()) + 2  # the .cu's line after the #include
        return f'#line 1 "{name}"\n{_read(folder, name).rstrip()}\n#line {after} "{family}.cu"'

    return _INCLUDE.sub(header, text)


def _kernels_folder():
    try:
        return resources.files("gpunet.kernels")
    except ModuleNotFoundError:
        return SOURCE_TREE_KERNELS


def _read(folder, name: str) -> str:
    path = folder.joinpath(name)
    if not path.is_file():
        raise FileNotFoundError(f"gpunet's kernel source {name} is missing (looked in {folder})")
    return path.read_text(encoding="utf-8")


def compile_inputs(family: str) -> tuple[str, ...]:
    """Everything the compiled code of a family depends on: its source (its headers' text in it) and the -D flags."""
    return (source(family), *DEFINE_FLAGS)


@functools.cache
def module(family: str):
    cupy = cupy_status()[0]
    if cupy is None:
        raise RuntimeError(cupy_status()[1])
    try:
        compiled = cupy.RawModule(code=source(family), options=NVRTC_OPTIONS)
        compiled.compile()
    except cupy.cuda.compiler.CompileException as exc:
        raise KernelCompileError(f"NVRTC could not compile gpunet/kernels/{family}.cu: {exc}") from None
    return compiled


@functools.cache
def kernel(family: str, name: str):
    """The kernel function, looked up once per process (get_function is not free)."""
    return module(family).get_function(name)


def clear_caches() -> None:
    """Forget compiled modules and kernel functions (when the CuPy in use changes, as in tests)."""
    kernel.cache_clear()
    module.cache_clear()


@dataclass(frozen=True)
class ArrayParam:
    """A pointer parameter: the array's dtype, and whether the kernel needs it C-contiguous."""
    dtype: numpy.dtype
    contiguous: bool = True


# A parameter type spelt as in the .cu file -> what its argument must be.
F32, F64, I32, I64, U32 = (numpy.dtype(t) for t in ("float32", "float64", "int32", "int64", "uint32"))
PARAMETER_TYPES = {"float*": ArrayParam(F32), "strided float*": ArrayParam(F32, contiguous=False),
                   "double*": ArrayParam(F64), "__half*": ArrayParam(numpy.dtype("float16")),
                   # ml_dtypes.bfloat16 (CuPy's bfloat16) by name: NumPy knows the name once ml_dtypes is
                   # imported, as it is wherever such an array exists (importing it here costs ~0.8 s)
                   "__nv_bfloat16*": ArrayParam("bfloat16"),  # type: ignore[arg-type]
                   "strided __half*": ArrayParam(numpy.dtype("float16"), contiguous=False),
                   "strided __nv_bfloat16*": ArrayParam("bfloat16", contiguous=False),  # type: ignore[arg-type]
                   "int*": ArrayParam(I32), "long long*": ArrayParam(I64), "unsigned int*": ArrayParam(U32),
                   "int": numpy.int32, "long long": numpy.int64, "float": numpy.float32, "double": numpy.float64}
_INTEGERS = (int, numpy.integer, numpy.bool_)  # what an int or long long parameter takes (a bool is 0 or 1)
_NUMBERS = (int, float, numpy.integer, numpy.floating, numpy.bool_)  # what a float or double parameter takes


class Kernel:
    """Kernel `name` of kernels/<family>.cu with its parameter types, spelt as the .cu declares
    them ("float*, int*, long long*, int, long long, float"; "strided float*" for an array the
    kernel reads through its strides, in any layout). kernel(grid, *args) launches it with
    `block` threads; its arguments are checked and converted by those types (marshal)."""

    __slots__ = ("family", "name", "signature", "block", "_params")

    def __init__(self, family: str, name: str, signature: str, block: int = THREADS):
        self.family, self.name, self.block = family, name, block
        self.signature = tuple(part.strip() for part in signature.split(","))
        unknown = [p for p in self.signature if p not in PARAMETER_TYPES]
        if unknown:
            raise ValueError(f"kernel {family}.{name}: unknown parameter types {unknown} "
                             f"(known: {list(PARAMETER_TYPES)})")
        self._params = tuple(PARAMETER_TYPES[p] for p in self.signature)

    def __call__(self, grid, *args) -> None:
        launch(self.family, self.name, grid, args, self.block, self._params)

    def __repr__(self) -> str:
        return f"Kernel({self.family}.{self.name}({', '.join(self.signature)}), block={self.block})"


def marshal(family: str, name: str, args: tuple, params: tuple | None = None) -> tuple:
    """The arguments as the kernel must receive them: the one place scalars are converted.

    With the kernel's parameter types (Kernel), each scalar becomes exactly its parameter's type
    (numpy.int32, int64 or float32) and each array must have its parameter's dtype and layout.
    Without them, Python ints and bools become int32 and floats float32. (CuPy itself would send
    a Python int as 8 bytes and a float as a double, which the kernels' int and float parameters
    would misread; a bool as 8 bytes or 1 depending on its version.) No argument may be None,
    which CuPy versions pass differently: a parameter a launch does not read gets any array of
    its dtype.
    """
    if params is None:
        return tuple(numpy.int32(a) if isinstance(a, (bool, int)) else numpy.float32(a) if isinstance(a, float)
                     else a for a in args)
    if len(args) != len(params):
        raise TypeError(f"kernel {family}.{name} takes {len(params)} arguments, got {len(args)}")
    converted = []
    for index, (param, value) in enumerate(zip(params, args)):
        if type(param) is ArrayParam:
            if getattr(value, "dtype", None) != param.dtype or (param.contiguous and not value.flags.c_contiguous):
                raise _refused(family, name, index, param, value)
        elif isinstance(value, _NUMBERS if param in (numpy.float32, numpy.float64) else _INTEGERS):
            value = param(value)  # (an int over the parameter's range raises OverflowError)
        else:
            raise _refused(family, name, index, param, value)
        converted.append(value)
    return tuple(converted)


def _refused(family: str, name: str, index: int, param, value) -> TypeError:
    got = type(value).__name__
    if isinstance(param, ArrayParam):
        if hasattr(value, "dtype") and hasattr(value, "flags"):
            got = f"{'' if value.flags.c_contiguous else 'non-contiguous '}{value.dtype} array"
            got = f"{'an' if got[0] in 'aeiou' else 'a'} {got}"
        want = f"a {'C-contiguous ' if param.contiguous else ''}{param.dtype} array"
    else:
        want = f"{'a number' if param is numpy.float32 else 'an integer'} (sent as {param.__name__})"
    return TypeError(f"kernel {family}.{name}, argument {index}: expected {want}, got {got}")


def launch(family: str, name: str, grid, args, block: int = THREADS, params: tuple | None = None) -> None:
    """Run kernel `name` of `family` with its arguments marshalled (marshal). A grid with no
    blocks is an error here, not at the driver: CuPy rounds each grid dimension up to 1, so an
    empty input would run one block over memory the op does not own. Every op returns early on
    empty inputs instead (the test suite's CuPy stand-in refuses such launches too)."""
    converted = marshal(family, name, args, params)
    grid = grid if isinstance(grid, tuple) else (grid,)
    if not all(isinstance(g, (int, numpy.integer)) and g >= 1 for g in grid):
        raise ValueError(f"kernel {family}.{name}: grid {grid} has no blocks; the op must return early on empty "
                         f"inputs")
    if len(grid) > 1 and grid[1] > MAX_GRID_Y:
        raise ValueError(f"kernel {family}.{name}: gridDim.y {grid[1]} is over the limit {MAX_GRID_Y}; use grid_2d")
    kernel(family, name)(grid, (block,), converted)


def done_blocks_counter():
    """The device's counter for kernels whose last block finishes a reduction (zero between
    launches: that block resets it). Kernels on one stream run one after another, so one serves all."""
    cupy = cupy_status()[0]
    device = cupy.cuda.Device().id
    counter = _DONE_BLOCKS.get(device)
    if counter is None:
        counter = _DONE_BLOCKS[device] = cupy.zeros(1, dtype=cupy.uint32)
    return counter


_DONE_BLOCKS: dict = {}  # device id -> its counter


def cupy_module():
    """The CuPy module the wrappers allocate with (None without one)."""
    return cupy_status()[0]


def ceil_div(total: int, per: int) -> int:
    return -(-total // per)


def blocks_for(total: int, block: int = THREADS) -> int:
    """Blocks for a grid-stride loop over `total` items: 0 for none (launch refuses it)."""
    return min(MAX_BLOCKS, -(-total // block))


def grid_2d(x_blocks: int, y_tiles: int) -> tuple[int, int]:
    """A 2-D grid over y_tiles row tiles, with gridDim.y capped: the kernels loop over the rest."""
    return x_blocks, min(y_tiles, MAX_GRID_Y)
