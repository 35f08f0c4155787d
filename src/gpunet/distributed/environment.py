"""Which launcher started this process, read from the environment only (no process is contacted).

mpiexec/mpirun set MPICH's PMI_RANK/PMI_SIZE (MPI_LOCALRANKID for the rank on the host) or Open
MPI's OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK; srun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS and
SLURM_LOCALID; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. An MPI
launcher is looked for first: mpiexec inside a SLURM allocation also sees SLURM_* variables, and
they describe the allocation, not this job. A batch script's own SLURM_PROCID/SLURM_NTASKS are
not a launch (one process runs the script): srun is recognised by SLURM_STEP_NUM_TASKS.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    """How this process was started: launcher is "none" (a single process), "mpi", "slurm" or
    "torchrun"; master_addr/master_port only for torchrun (NCCL's bootstrap address)."""

    launcher: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


# launcher, then the variables of (rank, world size, local rank); a missing local rank is 0
_LAUNCHERS = [
    ("mpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")),
    ("mpi", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")),
    ("mpi", ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")),
    ("slurm", ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")),
    ("torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK")),
]


def detect(env) -> Launch:
    """The Launch that env (a mapping like os.environ) describes. A variable that is set but is not
    a valid number raises ValueError naming it."""
    for launcher, (rank_name, size_name, local_name) in _LAUNCHERS:
        if rank_name not in env or size_name not in env:
            continue
        size = _number(env, size_name, low=1)
        rank = _number(env, rank_name, low=0)
        if rank >= size:
            raise ValueError(f"{rank_name}={rank} is not below {size_name}={size}: the launcher's variables "
                             "disagree")
        local = _number(env, local_name, low=0) if local_name in env else 0
        if launcher != "torchrun":
            return Launch(launcher, rank, size, local)
        port = _number(env, "MASTER_PORT", low=1) if "MASTER_PORT" in env else None
        if port is not None and port > 65535:
            raise ValueError(f"MASTER_PORT={port} is not a TCP port (1 to 65535)")
        return Launch(launcher, rank, size, local, env.get("MASTER_ADDR") or None, port)
    return Launch()


def _number(env, name: str, low: int) -> int:
    text = env[name].strip()
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"the environment variable {name}={env[name]!r} is not a whole number") from None
    if value < low:
        raise ValueError(f"the environment variable {name}={value} must be at least {low}")
    return value


def nccl_store(launch: Launch, env) -> dict:
    """Where rank 0 serves cupyx.distributed's TCP store (NCCL's bootstrap) for a torchrun launch:
    host MASTER_ADDR; port CUPYX_DISTRIBUTED_PORT when set, else MASTER_PORT + 1 (- 1 at 65535).
    Never MASTER_PORT itself: torchrun's agent listens there with its own store for the whole job,
    and cupyx binds its store in a child process whose failure nobody sees, after which the ranks
    would talk to torchrun's store. An empty dict when there is no MASTER_PORT (cupyx's defaults)."""
    store = {"host": launch.master_addr} if launch.master_addr else {}
    if "CUPYX_DISTRIBUTED_PORT" in env:
        port = _number(env, "CUPYX_DISTRIBUTED_PORT", low=1)
        if port > 65535 or port == launch.master_port:
            raise ValueError(f"CUPYX_DISTRIBUTED_PORT={port} must be a TCP port (1 to 65535) other than "
                             "MASTER_PORT, which torchrun holds")
        return {**store, "port": port}
    if launch.master_port is None:
        return store
    return {**store, "port": launch.master_port + 1 if launch.master_port < 65535 else launch.master_port - 1}
