"""cupy.cuda.memory for the stand-in: every device allocation goes through the current allocator,
as in CuPy 14 (cupy/cuda/memory.pyx: alloc() calls the thread-local allocator that
cupy.cuda.using_allocator sets, else the global one of set_allocator).

An allocation is an mmap that ends where a PROT_NONE page begins, so a kernel reading or writing
even one element past the end of its array faults (the emulator reports it as a KernelFault)
instead of silently touching a neighbour in NumPy's heap, as a GPU would corrupt memory silently.
Memory is never reused here (each allocation is fresh): a pool only accounts for what it gave.
"""
from __future__ import annotations

import ctypes
import mmap
import threading
import weakref


class OutOfMemoryError(MemoryError):
    pass


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_PROT_NONE = 0


class Memory:
    """`size` bytes of device memory ending at a guard page: `buffer` (the mmap) from `offset`."""

    def __init__(self, size: int):
        self.size = int(size)
        pages = max(1, -(-self.size // _PAGE))
        self.buffer = mmap.mmap(-1, (pages + 1) * _PAGE)
        start = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))
        if _libc.mprotect(ctypes.c_void_p(start + pages * _PAGE), ctypes.c_size_t(_PAGE), _PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
        # The allocation ends exactly at the guard page, so its start is aligned only to the size:
        # enough for gpunet's kernels, which make no vector (float4) loads.
        self.offset = pages * _PAGE - self.size
        self.ptr = start + self.offset
        _LIVE[self.ptr] = (self.size, weakref.ref(self.buffer, _forget(self.ptr)))  # (arrays keep the mmap alive)


# Every live allocation by its device address: (size, its mmap), for what reads memory by raw pointer
# outside a kernel (the stand-in's cuBLAS, cupy.cuda.cublas), which must refuse a range no allocation holds.
_LIVE: dict = {}


def _forget(start: int):
    def forget(dead_ref) -> None:  # (the address may hold a newer allocation by now: forget only this one)
        if _LIVE.get(start, (0, None))[1] is dead_ref:
            del _LIVE[start]
    return forget


def holding(ptr: int, nbytes: int) -> bool:
    """Whether one live allocation holds the nbytes from device address ptr."""
    return any(start <= ptr and ptr + nbytes <= start + size and buffer() is not None
               for start, (size, buffer) in list(_LIVE.items()))


class MemoryPointer:
    def __init__(self, mem: Memory, offset: int = 0):
        self.mem, self.ptr = mem, mem.ptr + offset


def _malloc(size: int) -> MemoryPointer:
    """CuPy's raw allocator (cudaMalloc): fresh memory."""
    return MemoryPointer(Memory(size))


_current_allocator = _malloc
_thread_local = threading.local()


def _get_thread_local_allocator():
    return getattr(_thread_local, "allocator", None)


def _set_thread_local_allocator(allocator) -> None:
    _thread_local.allocator = allocator


def get_allocator():
    return _get_thread_local_allocator() or _current_allocator


def set_allocator(allocator=None) -> None:
    global _current_allocator
    if _get_thread_local_allocator() is not None:
        raise ValueError("Can't change the global allocator inside `using_allocator` context manager")
    _current_allocator = _malloc if allocator is None else allocator


def alloc(size: int) -> MemoryPointer:
    """Calls the current allocator, as every device array the stand-in makes does."""
    pointer = get_allocator()(size)
    if not isinstance(pointer, MemoryPointer):
        raise TypeError(f"the allocator returned {type(pointer).__name__}, not a cupy.cuda.MemoryPointer")
    return pointer


class MemoryPool:
    """CuPy's pool, as far as a test can see it: malloc() allocates (fresh memory: the stand-in
    reuses none) and counts the bytes; total_bytes() says how many it gave out."""

    def __init__(self, allocator=None):
        self._allocator = allocator or _malloc
        self._total = 0
        self.allocations = 0

    def malloc(self, size: int) -> MemoryPointer:
        self._total += int(size)
        self.allocations += 1
        return self._allocator(size)

    def total_bytes(self) -> int:
        return self._total

    def used_bytes(self) -> int:
        return self._total

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self, stream=None) -> None:
        pass
