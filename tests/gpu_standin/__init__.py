"""Puts the CuPy stand-in (cupy/ and cupyx/ beside this file) in front of gpunet when no real GPU
is usable, so every GPU code path runs in CI: CupyOps, its launches, the kernels (in the
emulator), parity. A real, usable GPU always takes precedence.

Never import `tests.gpu_standin.cupy` directly: the stand-in is the module named `cupy`.
"""
from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
KIND: str | None = None  # what activate() decided, once


REQUIRE_GPU = "GPUNET_REQUIRE_GPU"  # =1 (scripts/gpu_session.sh): a real GPU or nothing


def activate() -> str:
    """"real" when CuPy sees a usable GPU, "standin" once the stand-in is in place, or the reason
    neither can run (no g++ to build the emulated kernels; or GPUNET_REQUIRE_GPU=1, under which the
    stand-in refuses to load, so that no GPU check passes on it). Decided once per process."""
    global KIND
    if KIND is None:
        KIND = _activate()
    return KIND


def _activate() -> str:
    from gpunet.backend import devices, dispatch

    usable, why = devices.gpu_status()
    if usable:
        return "real"
    if required():
        return f"{REQUIRE_GPU}=1 and the real GPU is unusable: {why}"
    if shutil.which("g++") is None:
        return "g++ is not on this machine, so the CuPy stand-in cannot build the emulated kernels"
    for name in [m for m in sys.modules if m == "cupy" or m.startswith(("cupy.", "cupyx"))]:
        del sys.modules[name]  # a real CuPy without a usable GPU, imported by the probe
    sys.path.insert(0, str(HERE))
    for cached in (devices.cupy_status, devices.gpu_status, dispatch.ops_for_device):
        cached.cache_clear()
    from gpunet.backend import cuda_kernels

    cuda_kernels.clear_caches()
    usable, why = devices.gpu_status()
    if not usable:
        raise RuntimeError(f"the CuPy stand-in is installed but gpunet does not take it: {why}")
    return "standin"


def required() -> bool:
    return os.environ.get(REQUIRE_GPU, "").strip() == "1"


def counters() -> dict:
    """Kernel launches and host<->device transfers so far (a copy)."""
    import cupy

    return dict(cupy.COUNTERS)


@contextmanager
def counting():
    """Yields a dict that, after the block, holds what the block launched and transferred."""
    before = counters()
    delta: dict = {}
    yield delta
    after = counters()
    delta.update({k: after[k] - before[k] for k in after})


@contextmanager
def cupy_faithful_capture():
    """Inside the block a host-to-device copy from cupy.asarray/cupy.array in a stream capture is
    recorded as real CuPy records it (an async copy from the staging buffer filled at capture; a 0-d
    value frozen into a fill kernel) instead of refused: what a replay would compute is then visible."""
    import cupy._ndarray as device_memory

    device_memory.RECORD_HOST_COPIES = True
    try:
        yield
    finally:
        device_memory.RECORD_HOST_COPIES = False
