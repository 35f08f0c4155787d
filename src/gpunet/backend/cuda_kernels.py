"""gpunet's CUDA kernels: the sources in gpunet/kernels/*.cu (one file per family), compiled by
NVRTC through cupy.RawModule on first use and cached for the process (CuPy also caches the
binaries on disk). A source that does not compile raises one KernelCompileError naming the file.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy

from gpunet.backend.devices import cupy_status

THREADS = 256
MAX_BLOCKS = 65536  # grid-stride kernels cover any size with at most this many blocks


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


def launch(family: str, name: str, grid, args, block: int = THREADS) -> None:
    """Run kernel `name` of `family`; Python ints and floats become int32 and float32."""
    converted = tuple(numpy.int32(a) if isinstance(a, (bool, int)) else numpy.float32(a) if isinstance(a, float)
                      else a for a in args)
    grid = grid if isinstance(grid, tuple) else (grid,)
    module(family).get_function(name)(grid, (block,), converted)


def blocks_for(total: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-total // THREADS)))
