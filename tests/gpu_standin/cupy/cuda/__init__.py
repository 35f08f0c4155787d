"""cupy.cuda for the stand-in: one emulated device, events timed on the host clock, the null
stream (launches run synchronously, so synchronising is free), CuPy 14's allocator routing
(memory.py) and an NCCL that is absent by default (nccl.py)."""
from __future__ import annotations

import contextlib
import time

import cupy._ndarray as device_memory
from cupy.cuda import compiler, memory, nccl, runtime  # noqa: F401
from cupy.cuda import cublas  # noqa: F401  (CuPy 14 imports it on first use: cupy.cuda.cublas)
from cupy.cuda.memory import MemoryPointer, MemoryPool, alloc, get_allocator, set_allocator  # noqa: F401

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
        self._captured = None

    def synchronize(self):
        if self._captured is not None:
            raise runtime.CUDARuntimeError("cudaErrorStreamCaptureUnsupported: synchronize on a capturing stream")

    # Graph capture, with CUDA's rules: not on the null (legacy) stream, one capture at a time here,
    # no synchronous copy to or from the host while capturing (_ndarray.count refuses them); stricter
    # than CuPy: cupy.asarray of host data is refused too, unless RECORD_HOST_COPIES (see _ndarray).
    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise runtime.CUDARuntimeError("cudaErrorStreamCaptureUnsupported: the null stream cannot capture")
        if device_memory.CAPTURING is not None:
            raise runtime.CUDARuntimeError("cudaErrorIllegalState: a capture is already in progress")
        self._captured = device_memory.CAPTURING = []

    def is_capturing(self) -> bool:
        return self._captured is not None

    def end_capture(self):
        if self._captured is None:
            raise runtime.CUDARuntimeError("cudaErrorIllegalState: end_capture without begin_capture")
        graph = Graph(self._captured)
        self._captured = device_memory.CAPTURING = None
        return graph

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


class Graph:
    """A captured sequence of kernels; launch() runs them all again, on the memory they had."""

    def __init__(self, replays: list):
        self._replays = replays

    def upload(self, stream=None):
        pass

    def launch(self, stream=None):
        if device_memory.CAPTURING is not None:
            raise runtime.CUDARuntimeError("cudaErrorStreamCaptureUnsupported: a graph launched inside a capture")
        device_memory.COUNTERS["graph_launches"] += 1
        for replay in self._replays:
            replay()


@contextlib.contextmanager
def using_allocator(allocator=None):
    """As CuPy 14's (cupy/cuda/__init__.py): a thread-local allocator for every allocation inside."""
    if allocator is None:
        allocator = memory._malloc
    previous = memory._get_thread_local_allocator()
    memory._set_thread_local_allocator(allocator)
    try:
        yield
    finally:
        memory._set_thread_local_allocator(previous)


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


def get_cublas_handle() -> int:
    """The current device's cuBLAS handle (cupy.cuda.get_cublas_handle, from cupy.cuda.device): any non-zero int."""
    return 1
