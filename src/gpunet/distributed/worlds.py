"""The processes of one job and their collectives: Single (one process, nothing imported), MPIWorld
(mpi4py; NumPy buffers, CuPy arrays through host copies) and NCCLWorld (cupyx.distributed's NCCL).

Collectives work in place on contiguous arrays (sum, max or min over the ranks). MPI collectives
are started non-blocking and waited for with a deadline, so a rank whose partner died or hangs
raises CollectiveTimeout naming the collective instead of waiting forever. A rank that fails
calls end_failed: when every rank fails at the same point (a divergence, a bad file they all
read) the job ends normally with the error; otherwise, after FAILURE_GRACE seconds, it aborts the
whole job (MPI_Abort) with its message on stderr, so no rank waits on a dead partner.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import numpy

from gpunet.backend import is_cupy_array
from gpunet.distributed.environment import nccl_store

FAILURE_GRACE = 3.0  # seconds a failing rank waits for the others to fail too before aborting the job
# MPI_Abort may end the job before the launcher has forwarded what the rank just printed (its one-line
# message came out empty once in a loaded CI run; chapel-lang/chapel#14464 saw the same): a short wait.
ABORT_LINE_SECONDS = 0.5
DEFAULT_TIMEOUT = 900.0  # seconds a collective may wait (the first GPU step compiles kernels)
OPS = ("sum", "max", "min")


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the world's timeout for the other ranks."""


class Single:
    """World size 1: every collective is the identity; nothing is imported."""

    backend = "single"

    def __init__(self, launch):
        self.launch = launch
        self.rank, self.world_size, self.local_rank = 0, 1, launch.local_rank

    def all_reduce(self, array, op: str = "sum"):
        _check(array, op, "all_reduce")
        return array

    def broadcast(self, array, root: int = 0):
        _check(array, "sum", "broadcast", root, 1)
        return array

    def broadcast_object(self, value, root: int = 0):
        return value

    def barrier(self) -> None:
        pass

    def end_failed(self, code: int, message: str | None) -> None:
        pass


class MPIWorld(Single):
    """The ranks of an MPI job (mpiexec, or srun with PMI), through mpi4py's COMM_WORLD."""

    backend = "mpi"

    def __init__(self, launch, timeout: float = DEFAULT_TIMEOUT):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise RuntimeError(f"this process is rank {launch.rank} of {launch.world_size} started by "
                               f"{launch.launcher}, but mpi4py cannot be imported ({exc}); install it with pip install "
                               "'gpunet[mpi]'") from None
        self.launch, self.timeout, self.MPI = launch, timeout, MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.world_size, self.local_rank = self.comm.Get_rank(), self.comm.Get_size(), launch.local_rank
        if (self.rank, self.world_size) != (launch.rank, launch.world_size):
            raise RuntimeError(f"MPI says rank {self.rank} of {self.world_size}, the environment ({launch.launcher}) "
                               f"rank {launch.rank} of {launch.world_size}: is mpi4py built for another MPI than the "
                               "mpiexec that started this job?")
        self.failures = self.comm.Dup()  # its own communicator: never matched against a training collective
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    def all_reduce(self, array, op: str = "sum"):
        _check(array, op, "all_reduce")
        host = _host(array)
        try:
            request = self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self._ops[op])
        except (KeyError, TypeError, ValueError) as exc:
            raise TypeError(f"all_reduce: MPI cannot reduce an array of {array.dtype} ({exc})") from None
        self._wait(request, f"all_reduce of {array.size} {array.dtype}")
        return _back(array, host)

    def broadcast(self, array, root: int = 0):
        _check(array, "sum", "broadcast", root, self.world_size)
        host = _host(array)
        try:
            request = self.comm.Ibcast(host, root=root)
        except (KeyError, TypeError, ValueError) as exc:
            raise TypeError(f"broadcast: MPI cannot send an array of {array.dtype} ({exc})") from None
        self._wait(request, f"broadcast of {array.size} {array.dtype} from rank {root}")
        return _back(array, host)

    def broadcast_object(self, value, root: int = 0):
        return self.comm.bcast(value, root=root)

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier(), "barrier")

    def _wait(self, request, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not request.Test():  # MPI's own blocking wait polls too; this one can give up
            if time.monotonic() > deadline:
                raise CollectiveTimeout(f"rank {self.rank}: {what} waited {self.timeout:g} s for the other ranks of "
                                        f"{self.world_size}; one of them is stuck or has died")

    def end_failed(self, code: int, message: str | None) -> None:
        request = self.failures.Ibarrier()
        deadline = time.monotonic() + FAILURE_GRACE
        while not request.Test():
            if time.monotonic() > deadline:
                _abort_line(self.rank, self.world_size, message)
                time.sleep(ABORT_LINE_SECONDS)
                self.comm.Abort(code or 1)
            time.sleep(0.005)


class NCCLWorld(Single):
    """One GPU per rank, collectives through cupyx.distributed's NCCL backend. Bootstrapped over MPI
    when mpiexec started the job, else over a TCP store that rank 0 serves at MASTER_ADDR on the port
    nccl_store picks (torchrun: not MASTER_PORT, which torchrun's own store holds)."""

    backend = "nccl"

    def __init__(self, launch, timeout: float = DEFAULT_TIMEOUT):
        import cupy
        from cupyx import distributed as cupy_distributed

        self.launch, self.timeout, self.cupy = launch, timeout, cupy
        cupy.cuda.Device(launch.local_rank % cupy.cuda.runtime.getDeviceCount()).use()  # one process per device
        if launch.launcher in ("mpi", "slurm"):
            options = {"use_mpi": True}
        else:
            options = nccl_store(launch, os.environ)
            if launch.rank == 0 and "port" in options:
                _check_free(options.get("host", "127.0.0.1"), options["port"])
        self.comm = cupy_distributed.init_process_group(launch.world_size, launch.rank, backend="nccl", **options)
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank

    def all_reduce(self, array, op: str = "sum"):
        _check(array, op, "all_reduce")
        device = self._device(array)
        self.comm.all_reduce(device, device, op)
        return _back(array, device) if device is not array else array

    def broadcast(self, array, root: int = 0):
        _check(array, "sum", "broadcast", root, self.world_size)
        device = self._device(array)
        self.comm.broadcast(device, root)
        return _back(array, device) if device is not array else array

    def broadcast_object(self, value, root: int = 0):
        # JSON, not pickle: nothing gpunet reads is ever unpickled (the values are paths and small records)
        data = numpy.frombuffer(json.dumps(value).encode(), dtype=numpy.uint8) if self.rank == root else None
        size = self.broadcast(numpy.array([0 if data is None else data.size], dtype=numpy.int64), root)
        buffer = data.copy() if data is not None else numpy.zeros(int(size[0]), dtype=numpy.uint8)
        return json.loads(self.broadcast(buffer, root).tobytes().decode())

    def barrier(self) -> None:
        self.comm.barrier()

    def _device(self, array):
        return array if not isinstance(array, numpy.ndarray) else self.cupy.asarray(array)

    def end_failed(self, code: int, message: str | None) -> None:
        # NCCL has no abort across processes here; torchrun (or mpiexec) ends the job when a rank exits non-zero
        _abort_line(self.rank, self.world_size, message)


def _check_free(host: str, port: int) -> None:
    """Refuse, in one line, a store port that rank 0 cannot bind (cupyx would not say: see nccl_store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as cupyx's store binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"rank 0 cannot serve NCCL's bootstrap store on {host}:{port} ({exc.strerror}); set "
                               "CUPYX_DISTRIBUTED_PORT to a free port (the same on every rank)") from None


def _check(array, op: str, what: str, root: int = 0, world_size: int = 1) -> None:
    if op not in OPS:
        raise ValueError(f"{what}: unknown op {op!r}; choose one of {', '.join(OPS)}")
    if not isinstance(array, numpy.ndarray) and not is_cupy_array(array):
        raise TypeError(f"{what}: takes a NumPy or CuPy array, got {type(array).__name__}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what}: the array of shape {tuple(array.shape)} is not contiguous; pass a contiguous copy "
                         "(collectives work in place on one buffer)")
    if isinstance(array, numpy.ndarray) and not array.flags.writeable:
        raise ValueError(f"{what}: the array of shape {tuple(array.shape)} is read-only")
    if not 0 <= root < world_size:
        raise ValueError(f"{what}: root {root} is not a rank of a world of {world_size}")


def _host(array):
    """array itself when it is a NumPy array; else a host copy (an MPI without CUDA support)."""
    return array if isinstance(array, numpy.ndarray) else array.get()


def _back(array, result):
    """Write result into array when they differ (a host or device copy was reduced)."""
    if result is array:
        return array
    if isinstance(array, numpy.ndarray):
        array[...] = result.get()
    else:
        array.set(result)
    return array


def _abort_line(rank: int, world_size: int, message: str | None) -> None:
    if message:
        print(f"gpunet: rank {rank} of {world_size} failed: {message}; ending the job", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
