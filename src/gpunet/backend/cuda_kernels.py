"""gpunet's CUDA kernels: the sources in gpunet/kernels/*.cu (one file per family), compiled by
NVRTC through cupy.RawModule on first use and cached for the process (CuPy also caches the
binaries on disk). A source that does not compile raises one KernelCompileError naming the file.

`launch` is the one place that turns Python arguments into kernel arguments and checks the grid.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy

from gpunet.backend.devices import cupy_status

THREADS = 256
MAX_BLOCKS = 65536  # grid-stride kernels cover any size with at most this many blocks
# gridDim.y (and z) is at most 65,535 on every CUDA GPU; kernels with a 2-D grid loop over the
# row tiles beyond it (grid-stride in y), so every launch caps y through grid_2d() below.
MAX_GRID_Y = 65535


class KernelCompileError(RuntimeError):
    """NVRTC rejected one of gpunet's kernel sources."""


# kernels/ sits at the repository root and is installed as the package gpunet.kernels; running
# from a source tree (PYTHONPATH=src, as on a machine without a package index) reads it there.
SOURCE_TREE_KERNELS = Path(__file__).resolve().parents[3] / "kernels"


def source(family: str) -> str:
    try:
        folder = resources.files("gpunet.kernels")
    except ModuleNotFoundError:
        folder = SOURCE_TREE_KERNELS
    path = folder.joinpath(f"{family}.cu")
    if not path.is_file():
        raise FileNotFoundError(f"gpunet's kernel source {family}.cu is missing (looked in {folder})")
    return path.read_text(encoding="utf-8")


@functools.cache
def module(family: str):
    cupy = cupy_status()[0]
    if cupy is None:
        raise RuntimeError(cupy_status()[1])
    try:
        compiled = cupy.RawModule(code=source(family), options=("--std=c++17",))
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


def launch(family: str, name: str, grid, args, block: int = THREADS) -> None:
    """Run kernel `name` of `family`; Python ints and bools become int32, floats float32.

    (CuPy itself would send a Python int as 8 bytes and a float as a double, which the kernels'
    int and float parameters would misread.) A grid with no blocks is an error: the CUDA driver
    refuses it, so every op returns early on empty inputs instead.
    """
    converted = tuple(numpy.int32(a) if isinstance(a, (bool, int)) else numpy.float32(a) if isinstance(a, float)
                      else a for a in args)
    grid = grid if isinstance(grid, tuple) else (grid,)
    if not all(isinstance(g, (int, numpy.integer)) and g >= 1 for g in grid):
        raise ValueError(f"kernel {family}.{name}: grid {grid} has no blocks; the op must return early on empty "
                         f"inputs")
    if len(grid) > 1 and grid[1] > MAX_GRID_Y:
        raise ValueError(f"kernel {family}.{name}: gridDim.y {grid[1]} is over the limit {MAX_GRID_Y}; use grid_2d")
    kernel(family, name)(grid, (block,), converted)


def blocks_for(total: int) -> int:
    """Blocks of THREADS for a grid-stride loop over `total` items: 0 for none (launch refuses it)."""
    return min(MAX_BLOCKS, -(-total // THREADS))


def grid_2d(x_blocks: int, y_tiles: int) -> tuple[int, int]:
    """A 2-D grid over y_tiles row tiles, with gridDim.y capped: the kernels loop over the rest."""
    return x_blocks, min(y_tiles, MAX_GRID_Y)
