"""cupyx.distributed for the CuPy stand-in: init_process_group and NCCLBackend with the checks and
the bootstrap of CuPy 14's (cupyx/distributed/_init.py, _nccl_comm.py, _store.py), collectives
carried between the ranks' processes by the TCP store instead of NCCL.

As in CuPy: "NCCL is not available" (RuntimeError) when cupy.cuda.nccl.available is false, which
is the stand-in's default (CuPy's [ctk] extra ships no NCCL); without use_mpi (or without mpi4py)
rank 0 serves the store on (host, port), by default CUPYX_DISTRIBUTED_HOST/PORT or
127.0.0.1:13333, and the other ranks connect there; with use_mpi the ranks meet through
MPI.COMM_WORLD and bind no port. Arrays must be device arrays of a dtype NCCL has, C- or
F-contiguous; ops are sum, prod, max, min.
Deliberately stricter: a port already in use raises OSError at once on rank 0 (CuPy binds in a
child process, whose failure the parent never sees: its ranks then talk to whatever holds the
port); a rank waits at most TIMEOUT seconds for the others (NCCL waits forever).
"""
from __future__ import annotations

import os

import numpy

from cupy._ndarray import count, ndarray
from cupy.cuda import nccl
from cupyx.distributed import _store

_DTYPES = set("bBiIlLqQefdFD")  # _nccl_comm._nccl_dtypes
_OPS = {"sum": numpy.sum, "prod": numpy.prod, "max": numpy.max, "min": numpy.min}
TIMEOUT = 60.0


def init_process_group(n_devices, rank, *, backend="nccl", host=None, port=None, use_mpi=False):
    if n_devices <= 0:
        raise ValueError(f"Invalid number of devices {n_devices}")
    if not 0 <= rank < n_devices:
        raise ValueError(f"Invalid number of rank {rank} {n_devices}")
    if backend != "nccl":
        raise ValueError(f"{backend} is not supported")
    if not nccl.available:
        raise RuntimeError("NCCL is not available")
    if host is None:
        host = os.environ.get("CUPYX_DISTRIBUTED_HOST", _store.DEFAULT_HOST)
    if port is None:
        port = int(os.environ.get("CUPYX_DISTRIBUTED_PORT", _store.DEFAULT_PORT))
    return NCCLBackend(n_devices, rank, host, port, use_mpi)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


class NCCLBackend:
    def __init__(self, n_devices, rank, host=_store.DEFAULT_HOST, port=_store.DEFAULT_PORT, use_mpi=False):
        self._n_devices, self.rank = n_devices, rank
        mpi = _mpi() if use_mpi else None  # as CuPy: use_mpi without mpi4py uses the TCP store
        self._use_mpi = mpi is not None
        self._server = None
        if self._use_mpi:  # the store on an ephemeral port of rank 0, its address sent over MPI
            self._mpi_comm = mpi.COMM_WORLD
            if self._mpi_comm.Get_rank() == 0:
                self._server = _store.Server(n_devices, "127.0.0.1", 0)
            address = self._mpi_comm.bcast(self._server.address if self._server else None, root=0)
        else:
            if rank == 0:
                self._server = _store.Server(n_devices, host, port)
            address = (host, port)
        self._store = _store.Proxy(address, TIMEOUT)
        self._sequence = 0

    def _exchange(self, payload):
        """Every rank's payload, in rank order (each rank calls the collectives in the same order)."""
        self._sequence += 1
        return self._store.exchange(self._sequence, self.rank, payload)

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        _check(in_array, out_array)
        if op not in _OPS:
            raise RuntimeError(f"Unknown op {op} for NCCL")
        if in_array.dtype.char in "FD" and op != "sum":
            raise ValueError("Only nccl.SUM is supported for complex arrays")
        parts = self._exchange(in_array._host.tobytes())
        stacked = numpy.stack([numpy.frombuffer(p, in_array.dtype).reshape(in_array.shape) for p in parts])
        count("launches")
        out_array._host[...] = _OPS[op](stacked, axis=0).astype(out_array.dtype, copy=False)

    def broadcast(self, in_out_array, root=0, stream=None):
        _check(in_out_array)
        parts = self._exchange(in_out_array._host.tobytes() if self.rank == root else None)
        count("launches")
        in_out_array._host[...] = numpy.frombuffer(parts[root], in_out_array.dtype).reshape(in_out_array.shape)

    def barrier(self):
        if self._use_mpi:
            self._mpi_comm.Barrier()
        else:
            self._exchange(None)

    def stop(self):
        if self._server is not None:
            self._server.stop()


def _check(*arrays):
    for array in arrays:
        if not isinstance(array, ndarray):  # NCCL takes device pointers: array.data.ptr
            raise AttributeError(f"'{type(array).__name__}' object has no attribute 'ptr' (NCCL takes cupy.ndarray)")
        if not (array.flags.c_contiguous or array.flags.f_contiguous):
            raise RuntimeError("NCCL requires arrays to be either c- or f-contiguous")
        if array.dtype.char not in _DTYPES:
            raise TypeError(f"Unknown dtype {array.dtype} for NCCL")
