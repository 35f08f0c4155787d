"""Compiling a CUDA source with NVRTC through ctypes, as cupy.RawModule does, without a GPU."""
from __future__ import annotations

import ctypes
import functools
import glob
import os
from pathlib import Path


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


def compile_source(source: str, name: str, options=("--std=c++17", "--gpu-architecture=sm_90")) -> tuple[bool, str]:
    """(compiled, log) for one source."""
    lib = library()
    program = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None) != 0:
        return False, "nvrtcCreateProgram failed"
    encoded = [o.encode() for o in options]
    result = lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return result == 0, log.value.decode(errors="replace")
