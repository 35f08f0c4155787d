"""gpunet's CUDA kernels compiled for the CPU (tests/cuda/emulator.cpp) and called through ctypes."""
from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import numpy
import pytest

ROOT = Path(__file__).parents[1]


@functools.cache
def library(build_dir: str):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not on this machine: the CUDA kernels cannot be emulated on the CPU")
    target = Path(build_dir) / "emulated_kernels.so"
    result = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                             "-I", str(ROOT / "kernels"), str(ROOT / "tests" / "cuda" / "emulator.cpp"), "-o",
                             str(target)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(target))


def call(lib, name: str, *args) -> None:
    """ints -> int, numpy.int64 -> long long, floats -> float, numpy arrays -> their data pointers."""
    converted = []
    for a in args:
        if isinstance(a, numpy.ndarray):
            assert a.flags.c_contiguous, name
            converted.append(ctypes.c_void_p(a.ctypes.data))
        elif isinstance(a, float):
            converted.append(ctypes.c_float(a))
        elif isinstance(a, numpy.int64):
            converted.append(ctypes.c_longlong(int(a)))
        else:
            converted.append(ctypes.c_int(int(a)))
    getattr(lib, f"run_{name}")(*converted)
