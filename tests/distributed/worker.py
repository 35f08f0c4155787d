"""What each rank runs in the data-parallel tests (`mpiexec -n 2 python tests/distributed/worker.py JOBS`),
and, called in-process, the single-process reference of the same training.

JOBS is a JSON list of jobs; each writes RESULT.rankR.npz (and .json) for its rank, so a test can see
what every rank did. Kept free of pytest: it runs in the launched ranks.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import numpy

import gpunet as gn
from gpunet import distributed


def dataset(model: str, n: int, seed: int = 7):
    """Synthetic inputs (no preprocessing) and labels for 10 classes, the same on every rank."""
    rng = numpy.random.default_rng(seed)
    shape = (n, 1, 28, 28) if model == "cnn" else (n, 784)
    return rng.normal(size=shape).astype("float32"), rng.integers(0, 10, size=n)


def build(model: str):
    gn.manual_seed(3)
    if model == "graph":  # a gn.Model: a residual join and a layer shared by two nodes
        x = gn.Input((784,))
        h = gn.layers.ReLU()(gn.layers.Dense(784, 32)(x))
        shared = gn.layers.Dense(32, 32, name="shared")
        r = shared(gn.layers.Tanh()(shared(h)))
        return gn.Model(x, gn.layers.Dense(32, 10)(gn.layers.Add()([h, r])))
    return gn.models.mlp((784, 64, 32, 10)) if model == "mlp" else gn.models.lenet(10)


class FailingData(gn.train.ArrayData):
    """Training data whose get raises on one rank at one call: a rank that fails on its own."""

    def __init__(self, x, y, rank: int, at: int):
        super().__init__(x, y)
        self.rank, self.at, self.calls = rank, at, 0

    def get(self, indices, rng):
        self.calls += 1
        if distributed.rank() == self.rank and self.calls == self.at:
            raise ValueError(f"bad training sample {int(indices[0])} (rank {self.rank})")
        return super().get(indices, rng)


def train(job: dict) -> dict:
    """fit as the job says; returns the final parameters (name -> array) and what the run reports."""
    model = build(job["model"])
    if job.get("device", "cpu") != "cpu":
        model.to(job["device"])
    x, y = dataset(job["model"], job["n"])
    if job.get("dtype"):  # float64: no rounding difference between 1 and 2 ranks large enough to flip a max-pool choice
        model.to(dtype=job["dtype"])
        x = x.astype(job["dtype"])
    val = dataset(job["model"], job["val"], seed=8) if job.get("val") else None
    data = FailingData(x, y, *job["fail"]) if job.get("fail") else (x, y)
    opt_name, lr = job.get("optimizer", ["sgd", 0.05])
    optimizer = (gn.optim.SGD(model, lr=lr, momentum=0.9) if opt_name == "sgd" else gn.optim.Adam(model, lr=lr))
    history = gn.fit(model, data, val, optimizer=optimizer, steps=job["steps"], batch_size=job["batch"],
                     seed=job.get("seed", 0), out_dir=job.get("out"), resume=job.get("resume", False),
                     eval_every=job.get("eval_every"), early_stopping=job.get("early_stopping"), progress=False,
                     restore_best=job.get("restore_best", False))
    params = {name: gn.to_numpy(value).copy() for name, value in model.params.items()}
    report = {"last_step": history.records[-1]["step"], "records": len(history), "written": [str(p) for p in
              history.written], "train_loss": history.records[-1]["train_loss"],
              "val_loss": history.records[-1].get("val_loss")}
    return params, report


def collectives(job: dict):
    """all_reduce (sum, max, min) and broadcast on arrays of several dtypes and shapes."""
    results = {}
    for key, array in reference_inputs(distributed.rank()).items():
        for op in ("sum", "max", "min"):
            results[f"{key}/{op}"] = distributed.all_reduce(array.copy(), op)
        results[f"{key}/broadcast"] = distributed.broadcast(array.copy(), root=1)
    distributed.barrier()
    return results, {"object": distributed.world().broadcast_object({"from": distributed.rank()}, root=1)}


def late_partner(job: dict):
    """Rank 1 joins an all_reduce 2 s late; rank 0 waits at most 0.5 s and reports the timeout, then both
    meet at a barrier (MPI matches rank 1's all_reduce with rank 0's pending one first)."""
    import time

    from gpunet.distributed.worlds import CollectiveTimeout, MPIWorld

    world = MPIWorld(distributed.detect(os.environ), timeout=0.5 if distributed.rank() == 0 else 30)
    message, started = None, time.monotonic()
    if world.rank == 1:
        time.sleep(2)
    try:
        world.all_reduce(numpy.ones(4))
    except CollectiveTimeout as exc:
        message = str(exc)
    waited = time.monotonic() - started
    world.timeout = 30
    world.barrier()
    return {}, {"message": message, "waited": waited}


def reference_inputs(rank: int) -> dict:
    """Rank rank's input arrays: a deterministic function of (rank, dtype, shape)."""
    arrays = {}
    for i, dtype in enumerate(["float32", "float64", "int32", "int64", "uint8"]):
        for j, shape in enumerate([(), (7,), (3, 5, 2), (1000,)]):
            rng = numpy.random.default_rng([rank, i, j])
            scale = 1.5 if dtype.startswith("float") else 1
            arrays[f"{dtype}{list(shape)}"] = numpy.asarray(rng.integers(0, 100, size=shape) * scale, dtype=dtype)
    return arrays


class WriteWatch:
    """Every file-system change this process asks for under folder (an audit hook: Python's own open,
    rename, replace, mkdir, remove)."""

    def __init__(self, folder):
        self.folder, self.seen = str(Path(folder).resolve()), []
        sys.addaudithook(self.hook)

    def hook(self, event, args):
        path = None
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR))
            path = args[0] if writing else None
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "os.symlink"):
            path = args[0]
        if path is not None and os.path.abspath(os.fsdecode(path)).startswith(self.folder):
            self.seen.append(f"{event} {os.fsdecode(path)}")


def main(jobs: list) -> None:
    if any(job.get("device") == "gpu" for job in jobs):
        from tests.gpu_standin import activate  # a real GPU when usable, else the CuPy stand-in

        assert activate() in ("real", "standin")
    # a hang shows where each rank waits (the tests time out at 60 s)
    faulthandler.dump_traceback_later(float(os.environ.get("WORKER_DUMP_AFTER", 45)), exit=True)
    rank = distributed.init(jobs[0].get("device", "cpu")).rank
    for job in jobs:
        watch = WriteWatch(job["out"]) if job.get("out") and job.get("watch") else None
        params, report = {"collectives": collectives, "late": late_partner, "train": train}[job["kind"]](job)
        report["world_size"] = distributed.world_size()
        report["backend"] = distributed.world().backend
        report["writes"] = watch.seen if watch else None
        numpy.savez(f"{job['result']}.rank{rank}.npz", **params)
        Path(f"{job['result']}.rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
