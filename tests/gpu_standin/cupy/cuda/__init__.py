"""cupy.cuda for the stand-in: one emulated device, events timed on the host clock, the null
stream (launches run synchronously, so synchronising is free)."""
from __future__ import annotations

import time

from cupy.cuda import compiler, memory, runtime  # noqa: F401

COMPUTE_CAPABILITY = "90"  # the kernels are checked against sm_90's limits (tests/cuda/emulator.py)


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if not 0 <= self.id < runtime.getDeviceCount():
            raise runtime.CUDARuntimeError(f"cudaErrorInvalidDevice: device {self.id} does not exist")
        self.compute_capability = COMPUTE_CAPABILITY

    def use(self):
        return self

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Stream:
    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else id(self)

    def synchronize(self):
        pass

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


def get_current_stream():
    return Stream.null


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._time = None

    def record(self, stream=None):
        self._time = time.perf_counter()

    def synchronize(self):
        pass

    @property
    def done(self):
        return True


def get_elapsed_time(start: Event, end: Event) -> float:
    """Milliseconds between two recorded events, as CuPy returns them."""
    if start._time is None or end._time is None:
        raise runtime.CUDARuntimeError("cudaErrorInvalidResourceHandle: an event was never recorded")
    return (end._time - start._time) * 1e3
