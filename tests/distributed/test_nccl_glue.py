"""NCCLWorld's glue to cupyx.distributed, in one process: a recording stand-in for the NCCL backend
(two ranks' worth of NCCL cannot run here; see the README). What it checks: the bootstrap options
taken from the launch, the device chosen from LOCAL_RANK, device arrays passed in place, host arrays
copied to the device and back, and objects broadcast as bytes."""
from __future__ import annotations

import sys
import types

import numpy
import pytest

from gpunet.distributed import Launch
from gpunet.distributed.worlds import NCCLWorld

pytestmark = pytest.mark.gpu


class RecordingBackend:
    """As cupyx.distributed.NCCLBackend; all_reduce acts as if a second rank held the same values."""

    def __init__(self):
        self.calls = []

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        self.calls.append(("all_reduce", type(in_array).__module__.split(".")[0], op, in_array is out_array))
        out_array[...] = in_array * 2 if op == "sum" else in_array

    def broadcast(self, in_out_array, root=0, stream=None):
        self.calls.append(("broadcast", type(in_out_array).__module__.split(".")[0], root))

    def barrier(self):
        self.calls.append(("barrier",))


@pytest.fixture
def nccl(monkeypatch):
    import cupy
    import cupyx

    made = {}

    def init_process_group(n_devices, rank, *, backend="nccl", host=None, port=None, use_mpi=False):
        made.update(n_devices=n_devices, rank=rank, backend=backend, host=host, port=port, use_mpi=use_mpi)
        made["backend_object"] = RecordingBackend()
        return made["backend_object"]

    fake = types.ModuleType("cupyx.distributed")
    fake.init_process_group = init_process_group
    monkeypatch.setitem(sys.modules, "cupyx.distributed", fake)
    monkeypatch.setattr(cupyx, "distributed", fake, raising=False)
    return made, cupy


def test_torchrun_launch_bootstraps_over_tcp_on_its_local_device(nccl):
    made, cupy = nccl
    world = NCCLWorld(Launch("torchrun", 1, 2, 0, "10.0.0.1", 29500))
    assert {k: made[k] for k in ("n_devices", "rank", "backend", "host", "port", "use_mpi")} == \
        {"n_devices": 2, "rank": 1, "backend": "nccl", "host": "10.0.0.1", "port": 29501, "use_mpi": False}
    assert (world.rank, world.world_size, world.backend) == (1, 2, "nccl")
    assert cupy.cuda.Device().id == 0


def test_mpiexec_launch_bootstraps_over_mpi(nccl):
    made, _ = nccl
    NCCLWorld(Launch("mpi", 0, 2, 0))
    assert made["use_mpi"] is True and made["host"] is None


def test_device_and_host_arrays_are_reduced_in_place(nccl):
    made, cupy = nccl
    world = NCCLWorld(Launch("torchrun", 0, 2, 0))
    on_device = cupy.asarray(numpy.arange(6, dtype="float32"))
    assert world.all_reduce(on_device) is on_device
    numpy.testing.assert_array_equal(cupy.asnumpy(on_device), numpy.arange(6) * 2)
    on_host = numpy.arange(3, dtype="float64")
    assert world.all_reduce(on_host, "max") is on_host
    numpy.testing.assert_array_equal(on_host, numpy.arange(3))
    backend = made["backend_object"]
    assert backend.calls == [("all_reduce", "cupy", "sum", True), ("all_reduce", "cupy", "max", True)]


def test_objects_are_broadcast_as_bytes_from_root(nccl):
    made, _ = nccl
    world = NCCLWorld(Launch("torchrun", 0, 2, 0))
    assert world.broadcast_object({"folder": "runs/x"}) == {"folder": "runs/x"}
    assert [c[0] for c in made["backend_object"].calls] == ["broadcast", "broadcast"]
    with pytest.raises(ValueError, match="root 2 is not a rank of a world of 2"):
        world.broadcast(numpy.zeros(1), root=2)
