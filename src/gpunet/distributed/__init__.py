"""Data-parallel training on existing engines: MPI through mpi4py on the CPU, NCCL through
cupyx.distributed on GPUs (MPI with host copies where NCCL is not usable).

`init()` reads how the process was launched (gpunet.distributed.environment): mpiexec/mpirun, srun,
or torchrun-style variables; a process with no launcher is world size 1 and imports nothing more.
One process per device: on GPUs rank r uses device LOCAL_RANK. The fit loop (gpunet.training.loop) takes its
Replicas from here, so `mpiexec -n 2 gpunet train ...` needs no new flag.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

from gpunet import errors
from gpunet.distributed.data_parallel import Replicas
from gpunet.distributed.environment import Launch, detect
from gpunet.distributed.worlds import DEFAULT_TIMEOUT, CollectiveTimeout, MPIWorld, NCCLWorld, Single

__all__ = ["init", "world", "rank", "world_size", "local_rank", "barrier", "all_reduce", "broadcast", "replicas",
           "ends_together", "Launch", "detect", "CollectiveTimeout"]

_world = None


def init(device: str | None = None, timeout: float = DEFAULT_TIMEOUT):
    """The world of this process, made on the first call (later calls return it), of the kind
    backend_for picks. timeout: the seconds a collective waits for the other ranks."""
    global _world
    if _world is None:
        launch = detect(os.environ)
        worlds = {"single": Single, "nccl": NCCLWorld, "mpi": MPIWorld}
        _world = worlds[backend_for(launch, device)](*((launch,) if launch.world_size == 1 else (launch, timeout)))
    return _world


def backend_for(launch: Launch, device: str | None) -> str:
    """"single" with no launcher; "nccl" for a torchrun launch, or for device "gpu" where CuPy has
    NCCL; else "mpi" (GPU arrays through host copies: rank 0 says so in one line when NCCL is what
    is missing). A torchrun launch on the CPU, or without NCCL, is refused in one line: torchrun
    starts no MPI world to fall back on."""
    if launch.world_size == 1:
        return "single"
    if launch.launcher == "torchrun":
        if device == "cpu":
            raise RuntimeError(f"a torchrun launch (RANK={launch.rank}, WORLD_SIZE={launch.world_size}) trains on "
                               "GPUs through NCCL; on the CPU start the ranks with mpiexec -n N (pip install "
                               "'gpunet[mpi]')")
        usable, why = nccl_status()
        if not usable:
            raise RuntimeError(f"a torchrun launch (RANK={launch.rank}, WORLD_SIZE={launch.world_size}) needs NCCL, "
                               f"and {why}: install it (the cuda12/cuda13 extras bring nvidia-nccl-cu12/-cu13), or "
                               "start the ranks with mpiexec -n N, whose collectives fall back to MPI host copies")
        return "nccl"
    if device != "gpu":
        return "mpi"
    usable, why = nccl_status()
    if usable:
        return "nccl"
    if launch.rank == 0:
        print(f"gpunet: {why}; the {launch.world_size} ranks' collectives go through MPI with host copies (slower)",
              file=sys.stderr, flush=True)
    return "mpi"


def nccl_status() -> tuple[bool, str]:
    """(usable, why not): cupyx.distributed imports and CuPy loaded NCCL's library. (cupyx.distributed
    imports without NCCL, with a warning; its init_process_group then raises "NCCL is not available".)"""
    try:
        # CuPy's own multi-line warning when libnccl is missing (the filter ends with the block)
        with warnings.catch_warnings(action="ignore"):
            from cupy.cuda import nccl
            from cupyx import distributed  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CuPy raising anything
        return False, f"NCCL is not usable (cupyx.distributed cannot be imported: {type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", False):
        return False, "NCCL is not usable (CuPy cannot load its library; CuPy's [ctk] extra ships none)"
    return True, ""


def world():
    return init()


def rank() -> int:
    return init().rank


def world_size() -> int:
    return init().world_size


def local_rank() -> int:
    return init().local_rank


def barrier() -> None:
    init().barrier()


def all_reduce(array, op: str = "sum"):
    """Reduce array over the ranks (op "sum", "max" or "min") in place, and return it."""
    return init().all_reduce(array, op)


def broadcast(array, root: int = 0):
    """Overwrite array on every rank with root's, in place, and return it."""
    return init().broadcast(array, root)


def replicas(device: str | None = None) -> Replicas:
    """The fit loop's Replicas for this process's world."""
    return Replicas(init(device))


@contextlib.contextmanager
def ends_together():
    """Around work that all ranks do: an exception on some ranks only ends the whole job within
    seconds (with its message) instead of leaving the others waiting in a collective; one that every
    rank raises is raised as usual. With world size 1 (or before init) it does nothing."""
    try:
        yield
    except BaseException as exc:
        if _world is not None and _world.world_size > 1 and not (isinstance(exc, SystemExit) and not exc.code):
            code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
            _world.end_failed(code, None if isinstance(exc, SystemExit) else errors.describe(exc))
        raise
