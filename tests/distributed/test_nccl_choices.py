"""Which collectives a GPU job gets, each choice through the CuPy stand-in's cupyx.distributed (CuPy 14's
checks and bootstrap; tests/gpu_standin/cupyx/distributed):
- mpiexec with NCCL: NCCLWorld bootstrapped over MPI (without NCCL: MPI host copies, test_ranks.py);
- torchrun without NCCL: refused in one line naming NCCL (torchrun starts no MPI world to fall back on);
- torchrun with NCCL: NCCLWorld, whose TCP store is not on MASTER_PORT, which torchrun's agent holds (the
  ranks are started by the real torchrun of the installed PyTorch)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from gpunet import distributed
from gpunet.distributed import Launch
from tests.distributed import worker

pytestmark = pytest.mark.gpu
WORKER = Path(worker.__file__)
ROOT = WORKER.parents[2]
LAUNCH_TIMEOUT = 90  # seconds: torchrun's start included
LAUNCHER_PREFIXES = ("PMI_", "OMPI_", "PMIX_", "SLURM_", "MPI_LOCALRANKID")
TORCHRUN_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUPYX_DISTRIBUTED_PORT")
NO_NCCL = "NCCL is not usable (CuPy cannot load its library; CuPy's [ctk] extra ships none)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_port() -> socket.socket:
    """A listening socket, as torchrun's agent holds MASTER_PORT for the whole job."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.fixture
def torchrun_rank0(monkeypatch):
    """This process as rank 0 of 2 started by torchrun (MASTER_PORT held by its agent), no world made yet."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES) or name in TORCHRUN_NAMES:
            monkeypatch.delenv(name)
    agent = held_port()
    port = agent.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_world", None)
    yield port
    world = distributed._world
    if world is not None and hasattr(world.comm, "stop"):
        world.comm.stop()
    agent.close()


@pytest.fixture
def nccl(monkeypatch):
    from cupy.cuda import nccl as module

    monkeypatch.setattr(module, "available", True)
    return module


MPI, SLURM, TORCHRUN = Launch("mpi", 0, 2, 0), Launch("slurm", 1, 4, 1), Launch("torchrun", 0, 2, 0, "127.0.0.1", 29500)
FALLBACK = f"gpunet: {NO_NCCL}; the 2 ranks' collectives go through MPI with host copies (slower)\n"


@pytest.mark.parametrize("launch, device, has_nccl, backend, said", [
    (Launch(), "gpu", True, "single", ""),
    (MPI, "gpu", True, "nccl", ""),
    (MPI, "gpu", False, "mpi", FALLBACK),  # rank 0 says it
    (SLURM, "gpu", False, "mpi", ""),  # (rank 1 of srun: quiet)
    (SLURM, "gpu", True, "nccl", ""),
    (MPI, "cpu", True, "mpi", ""),
    (TORCHRUN, "gpu", True, "nccl", ""),
    (TORCHRUN, None, True, "nccl", ""),
], ids=["single", "mpiexec-nccl", "mpiexec-no-nccl", "srun-no-nccl", "srun-nccl", "mpiexec-cpu", "torchrun-nccl",
        "torchrun-unsaid-device"])
def test_each_launcher_gets_its_collectives(monkeypatch, capsys, launch, device, has_nccl, backend, said):
    from cupy.cuda import nccl as module

    monkeypatch.setattr(module, "available", has_nccl)
    assert distributed.backend_for(launch, device) == backend
    assert capsys.readouterr().err == said


def test_torchrun_on_the_cpu_is_refused_in_one_line(capsys):
    with pytest.raises(RuntimeError) as raised:
        distributed.backend_for(TORCHRUN, "cpu")
    assert str(raised.value) == ("a torchrun launch (RANK=0, WORLD_SIZE=2) trains on GPUs through NCCL; on the CPU start "
                                 "the ranks with mpiexec -n N (pip install 'gpunet[mpi]')")
    assert capsys.readouterr().err == ""


def test_torchrun_without_nccl_is_refused_in_one_line_naming_nccl(torchrun_rank0):
    with pytest.raises(RuntimeError) as raised:
        distributed.init("gpu")
    assert str(raised.value) == (
        f"a torchrun launch (RANK=0, WORLD_SIZE=2) needs NCCL, and {NO_NCCL}: install it (the cuda12/cuda13 extras "
        "bring nvidia-nccl-cu12/-cu13), or start the ranks with mpiexec -n N, whose collectives fall back to MPI "
        "host copies")
    assert distributed._world is None


def test_torchrun_with_nccl_serves_its_store_beside_master_port_not_on_it(torchrun_rank0, nccl):
    world = distributed.init("gpu")
    assert world.backend == "nccl" and (world.rank, world.world_size) == (0, 2)
    server = world.comm._server  # the stand-in's store, served by rank 0
    assert server.address == ("127.0.0.1", torchrun_rank0 + 1)
    # what the old code did, passing MASTER_PORT: the stand-in refuses the second bind (CuPy would not say)
    from cupyx import distributed as cupyx_distributed

    with pytest.raises(OSError, match="Address already in use"):
        cupyx_distributed.init_process_group(2, 0, host="127.0.0.1", port=torchrun_rank0)


def test_a_store_port_in_use_is_refused_in_one_line(torchrun_rank0, nccl, monkeypatch):
    taken = held_port()
    port = taken.getsockname()[1]
    monkeypatch.setenv("CUPYX_DISTRIBUTED_PORT", str(port))
    try:
        with pytest.raises(RuntimeError) as raised:
            distributed.init("gpu")
    finally:
        taken.close()
    assert str(raised.value) == (f"rank 0 cannot serve NCCL's bootstrap store on 127.0.0.1:{port} (Address already in "
                                 "use); set CUPYX_DISTRIBUTED_PORT to a free port (the same on every rank)")


def test_cupyx_distributed_says_what_real_cupy_says(nccl, monkeypatch):
    from cupy.cuda import nccl as module
    from cupyx import distributed as cupyx_distributed

    with pytest.raises(ValueError, match="^Invalid number of rank 2 2$"):
        cupyx_distributed.init_process_group(2, 2)
    monkeypatch.setattr(module, "available", False)
    with pytest.raises(RuntimeError, match="^NCCL is not available$"):
        cupyx_distributed.init_process_group(2, 0, port=free_port())


def _check_collectives(result: str, backend: str) -> None:
    inputs = [worker.reference_inputs(rank) for rank in (0, 1)]
    for rank in (0, 1):
        got = dict(numpy.load(f"{result}.rank{rank}.npz"))
        report = json.loads(Path(f"{result}.rank{rank}.json").read_text())
        assert report == {"object": {"from": 1}, "world_size": 2, "writes": None, "backend": backend}
        for key in inputs[0]:
            stacked = numpy.stack([inputs[0][key], inputs[1][key]])
            expected = {"sum": stacked.sum(0, dtype=stacked.dtype), "max": stacked.max(0), "min": stacked.min(0),
                        "broadcast": inputs[1][key]}
            for op, value in expected.items():
                assert got[f"{key}/{op}"].dtype == value.dtype
                numpy.testing.assert_array_equal(got[f"{key}/{op}"], value, err_msg=f"{key} {op} on rank {rank}")


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not (k.startswith(LAUNCHER_PREFIXES) or k in TORCHRUN_NAMES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["GPUNET_STANDIN_NCCL"] = "1"  # the stand-in's cupy.cuda.nccl.available
    return env


def test_two_ranks_started_by_torchrun_reduce_through_nccl(tmp_path):
    pytest.importorskip("torch.distributed.run", reason="torchrun comes with PyTorch (the test extra)")
    port = free_port()
    jobs = [{"kind": "collectives", "device": "gpu", "result": str(tmp_path / "t")}]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), str(WORKER), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    _check_collectives(jobs[0]["result"], "nccl")


def test_two_ranks_started_by_mpiexec_with_nccl_reduce_through_nccl(tmp_path):
    pytest.importorskip("mpi4py", reason="the mpi extra (pip install -e '.[mpi]') is not installed")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH (the mpich wheel of the mpi extra)")
    jobs = [{"kind": "collectives", "device": "gpu", "result": str(tmp_path / "m")}]
    done = subprocess.run([mpiexec, "-n", "2", sys.executable, str(WORKER), json.dumps(jobs)], capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT, env=_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NCCL is not usable" not in done.stderr
    _check_collectives(jobs[0]["result"], "nccl")
