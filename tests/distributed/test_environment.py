"""Launch detection from environment variables alone (no process is started or contacted)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from gpunet.distributed import Launch, detect
from gpunet.distributed.data_parallel import Replicas
from gpunet.distributed.worlds import Single


@pytest.mark.parametrize("env, expected", [
    ({}, Launch()),
    # MPICH's hydra (mpiexec -n 4), as this machine's mpich wheel sets them
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "PMI_FD": "9"}, Launch("mpi", 2, 4, 1)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3"},
     Launch("mpi", 3, 8, 3)),
    ({"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, Launch("mpi", 1, 2, 0)),
    # srun: a job step of 16 tasks; SLURM_NTASKS alone (a batch script) is one process
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"},
     Launch("slurm", 5, 16, 1)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "77"}, Launch()),
    # mpiexec inside a SLURM allocation: the MPI launcher's numbers win
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, Launch("mpi", 1, 2, 0)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
     Launch("torchrun", 1, 2, 1, "10.0.0.1", 29500)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, Launch("torchrun", 0, 1, 0)),
])
def test_detects_the_launcher(env, expected):
    assert detect(env) == expected


@pytest.mark.parametrize("env, message", [
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x' is not a whole number"),
    ({"PMI_RANK": "2", "PMI_SIZE": "2"}, "PMI_RANK=2 is not below PMI_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
])
def test_bad_variables_are_named(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        detect(env)


def test_world_size_one_imports_no_mpi():
    """A process with no launcher trains alone and never imports mpi4py."""
    code = ("import sys, numpy, gpunet as gn\n"
            "from gpunet import distributed\n"
            "model = gn.models.mlp((4, 3)); x = numpy.ones((6, 4), 'float32'); y = numpy.arange(6) % 3\n"
            "gn.fit(model, (x, y), optimizer=gn.optim.SGD(model, lr=0.1), steps=2, batch_size=4, progress=False)\n"
            "print(distributed.world_size(), distributed.world().backend, 'mpi4py' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_")) and k not in ("RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "single", "False"]


def test_one_rank_shares_are_the_whole_batch():
    import numpy

    one = Replicas(Single(Launch()))
    idx = numpy.arange(5)
    assert one.share(idx) is idx and one.stream(0, 1, 2) == [0, 1, 2] and one.writes
    assert one.any(True, now=False) and not one.any(False)


@pytest.mark.parametrize("n, world, sizes", [(5, 2, [2, 3]), (1, 2, [0, 1]), (10, 3, [3, 3, 4]), (0, 2, [0, 0])])
def test_shares_cover_the_batch_once(n, world, sizes):
    import numpy

    class Fake:
        world_size = world

    parts = []
    for rank in range(world):
        fake = Fake()
        fake.rank = rank
        parts.append(Replicas(fake).share(numpy.arange(n)))
    assert [len(p) for p in parts] == sizes
    assert numpy.array_equal(numpy.concatenate(parts), numpy.arange(n))
