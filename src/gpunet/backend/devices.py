"""Which device to run on, and why.

Two separate facts: CuPy imports (`has_cupy`), and a CUDA device is usable (`has_gpu`).
CuPy installed on a machine without a driver or a GPU is a normal case, so every probe of the
device happens inside try/except and ends in a reason a person can act on.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy

from gpunet.validate import env_choice

DEVICE_NAMES = ("auto", "cpu", "gpu")


@functools.lru_cache(maxsize=1)
def cupy_status() -> tuple[Any, str]:
    """(cupy module or None, reason it is unusable or '')."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken install raising anything
        return None, f"CuPy is not installed ({type(exc).__name__}: {exc}); install gpunet[cuda12] or gpunet[cuda13]"
    return cupy, ""


@functools.lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """(usable, reason): a device counts as usable once a tiny kernel has run on it."""
    cupy, reason = cupy_status()
    if cupy is None:
        return False, reason
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy is installed but the CUDA driver is unusable ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "CuPy is installed but no CUDA device is visible"
    try:
        total = float(cupy.arange(4, dtype=cupy.float32).sum())
    except Exception as exc:
        return False, f"a CUDA device exists but a test kernel failed ({type(exc).__name__}: {exc})"
    if total != 6.0:
        return False, f"a CUDA device exists but a test kernel returned {total} instead of 6.0"
    return True, ""


def configure_tf32(cupy) -> bool:
    """Put cuBLAS float32 products in the mode GPUNET_TF32 asks for; returns whether TF32 is on.

    TF32 tensor cores round the inputs of float32 products to 10 mantissa bits, so gpunet keeps
    them off unless GPUNET_TF32=1: GPU results then match the CPU's to float32 precision. CuPy
    decides by itself from CUPY_TF32, read once at its first float32 product (an inherited
    CUPY_TF32=1, or a CuPy imported and used before gpunet, would turn TF32 on silently), and keeps
    the mode in cupy._core's compute type, which can be set at any time: gpunet sets it. A CuPy
    without that setting leaves CUPY_TF32 in charge, and gpunet says so in one line when it is on.
    """
    wanted = env_choice("GPUNET_TF32") == "1"
    core: Any = getattr(cupy, "_core", None)
    linalg = getattr(core, "_routines_linalg", None)
    if linalg is not None and hasattr(core, "set_compute_type") and hasattr(core, "get_compute_type"):
        core.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_TF32 if wanted else linalg.COMPUTE_TYPE_DEFAULT)
        # before compute capability 8.0 CuPy falls back to the default: report what is in force
        return core.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_TF32
    inherited = os.environ.get("CUPY_TF32", "0").strip()
    on = inherited.lstrip("+").isdigit() and int(inherited) > 0  # as CuPy reads it: int(CUPY_TF32) > 0
    if on and not wanted:
        print(f"gpunet: TF32 is on for float32 products on the GPU because CUPY_TF32={inherited} is set "
              "(this CuPy cannot be told otherwise); unset it for full float32 precision", file=sys.stderr)
    return on


def gpu_name(index: int = 0) -> str:
    """The CUDA device's name, e.g. 'NVIDIA H200' (CuPy gives bytes or str by version)."""
    name = cupy_status()[0].cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def has_cupy() -> bool:
    return cupy_status()[0] is not None


def has_gpu() -> bool:
    return gpu_status()[0]


@dataclass(frozen=True)
class Device:
    """A place arrays live: name is "cpu" or "gpu", xp is numpy or cupy."""

    name: str
    reason: str = ""
    index: int = 0  # which GPU (cupy.cuda.Device(index)); 0 on the CPU

    @property
    def xp(self) -> Any:
        return numpy if self.name == "cpu" else cupy_status()[0]

    def __str__(self) -> str:
        return self.name


def check_device_name(name) -> str:
    """name as device() reads it ("auto", "cpu", "gpu" or "gpu:N"); ValueError naming the choices."""
    requested = "auto" if name is None else str(name).strip().lower()
    kind, colon, index = requested.partition(":")
    if requested in DEVICE_NAMES or (kind == "gpu" and colon and index.isdigit() and index.isascii()):
        return requested
    raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_NAMES)} or gpu:N (N: the GPU's "
                     "number, 0 first)")


_selected_gpu: list[int] = []  # the GPU this process runs on, once one was picked by number


def _select_gpu(index: int) -> str:
    """Make GPU `index` CuPy's current device (for this process: kernels compile and load on it); the reason."""
    cupy = cupy_status()[0]
    count = cupy.cuda.runtime.getDeviceCount()
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(f"device 'gpu:{index}' was requested but only {count} GPU{'s are' if count > 1 else ' is'} "
                           f"visible (gpu:0{f' to gpu:{count - 1}' if count > 1 else ''})"
                           + (f"; CUDA_VISIBLE_DEVICES={visible} renumbers the GPUs it lists from 0" if visible else ""))
    if _selected_gpu and _selected_gpu[0] != index:
        raise RuntimeError(f"device 'gpu:{index}' was requested but this process already runs on gpu:{_selected_gpu[0]}; "
                           "gpunet uses one GPU per process (start another process for another GPU)")
    cupy.cuda.Device(index).use()
    _selected_gpu[:] = [index]
    return f"asked for GPU {index} ({gpu_name(index)})"


def device(name: str | Device | None = "auto") -> Device:
    """Resolve "auto" | "cpu" | "gpu" | "gpu:N" to a Device.

    "auto" (the default) may be replaced by the environment variable GPUNET_DEVICE. It picks
    the GPU when one is usable, else the CPU with one warning line saying why. "gpu" without a
    usable GPU raises RuntimeError saying why. "gpu:N" picks the N-th GPU that CUDA shows this process
    (CUDA_VISIBLE_DEVICES, read by CUDA itself, chooses and renumbers them) for the whole process.
    """
    if isinstance(name, Device):
        return name
    requested = check_device_name(name)
    if requested.startswith("gpu:"):
        usable, why = gpu_status()
        if not usable:
            raise RuntimeError(f"device {requested!r} was requested but no GPU is usable: {why}")
        index = int(requested[4:])
        return Device("gpu", _select_gpu(index), index)
    if requested == "auto":
        env = env_choice("GPUNET_DEVICE")
        if env in ("cpu", "gpu"):
            resolved = device(env)
            return Device(resolved.name, f"GPUNET_DEVICE={env}")
    if requested == "cpu":
        return Device("cpu", "asked for the CPU")
    usable, why = gpu_status()
    if requested == "gpu":
        if not usable:
            raise RuntimeError(f"device 'gpu' was requested but no GPU is usable: {why}")
        return Device("gpu", "asked for the GPU")
    if usable:
        return Device("gpu", "a CUDA GPU is usable")
    print(f"gpunet: no usable GPU, running on the CPU: {why}", file=sys.stderr)
    return Device("cpu", f"no usable GPU: {why}")


def device_info() -> list[str]:
    """Human-readable lines on CuPy, CUDA and the device "auto" picks."""
    cupy, why_not = cupy_status()
    lines = [f"CuPy: {cupy.__version__}" if cupy is not None else f"CuPy: not available ({why_not})"]
    usable, why = gpu_status()
    if cupy is not None:
        try:
            runtime = cupy.cuda.runtime.runtimeGetVersion()
            lines.append(f"CUDA runtime: {runtime // 1000}.{runtime % 1000 // 10}")
            if usable:
                props = cupy.cuda.runtime.getDeviceProperties(0)
                lines.append(f"GPU 0: {gpu_name(0)} ({props['totalGlobalMem'] / 2**30:.1f} GiB)")
        except Exception as exc:
            lines.append(f"CUDA: unavailable ({type(exc).__name__}: {exc})")
    lines.append("GPU usable: yes" if usable else f"GPU usable: no ({why})")
    env = env_choice("GPUNET_DEVICE")
    lines.append(f"auto picks: {'gpu' if usable else 'cpu'}"
                 + (f" (GPUNET_DEVICE={env} overrides it)" if env != "auto" else ""))
    return lines
