"""Compiling a CUDA source with NVRTC through ctypes, as cupy.RawModule does, without a GPU."""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import shutil
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


@functools.cache
def library():
    """libnvrtc from the nvidia-cuda-nvrtc wheel or a CUDA toolkit, or None."""
    candidates = []
    try:
        import nvidia
        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
            candidates += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    for path in candidates:
        if "builtins" in Path(path).name:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@functools.cache
def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include folder (cuda_fp16.h, cuda_bf16.h...), which cupy.RawModule hands NVRTC as
    -I (CuPy's compile_with_cache adds its CUDA path's include folder), or None where there is none."""
    homes = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    try:
        import nvidia
        homes += [os.path.join(root, "cu13") for root in nvidia.__path__]  # the CUDA 13 wheels' layout
    except ImportError:
        pass
    for home in homes:
        if home and os.path.isfile(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


def kernel_headers() -> dict[str, str]:
    """kernels/*.cuh by name: what a .cu file's `#include "common.cuh"` finds (nvcc, beside the file)."""
    return {path.name: path.read_text() for path in sorted(KERNELS.glob("*.cuh"))}


def compile_source(source: str, name: str, options=("--std=c++17", "--gpu-architecture=sm_90"),
                   headers: dict[str, str] | None = None) -> tuple[bool, str]:
    """(compiled, log) for one source. headers: {include name: text}, handed to NVRTC in memory, as
    nvcc finds a header beside the .cu file (NVRTC has no such folder); by default kernels/*.cuh.
    (gpunet itself hands CuPy the text with its headers in place: cuda_kernels.source.) The CUDA toolkit's
    headers (<cuda_fp16.h>) come from its include folder, as CuPy gives it (cuda_include_dir)."""
    lib = library()
    if cuda_include_dir() is not None:
        options = (*options, f"-I{cuda_include_dir()}")
    headers = kernel_headers() if headers is None else headers
    texts = (ctypes.c_char_p * max(1, len(headers)))(*(text.encode() for text in headers.values()))
    names = (ctypes.c_char_p * max(1, len(headers)))(*(include.encode() for include in headers))
    program = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), len(headers), texts,
                              names) != 0:
        return False, "nvrtcCreateProgram failed"
    encoded = [o.encode() for o in options]
    result = lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return result == 0, log.value.decode(errors="replace")
