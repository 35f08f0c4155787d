"""Two ranks over localhost (mpiexec from the `mpi` extra's MPICH wheel), each launch bounded by a
timeout: collectives, equivalence with one process, files, early stopping, resume, a failing rank."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

import gpunet as gn
from gpunet.parity import relative_difference
from tests.distributed import worker

pytest.importorskip("mpi4py", reason="the mpi extra (pip install -e '.[mpi]') is not installed")
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (the mpich wheel of the mpi extra)")
WORKER = Path(worker.__file__)
ROOT = WORKER.parents[2]  # on the ranks' path: the worker imports tests.gpu_standin for GPU jobs
LAUNCH_TIMEOUT = 60  # seconds: no launch may hang the suite


def launch_environment() -> dict:
    """This process's environment without any launcher's variables (pytest itself may run under one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def launch(jobs, ranks: int = 2, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    env = launch_environment()
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(WORKER), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def outcome(result: str, rank: int):
    return dict(numpy.load(f"{result}.rank{rank}.npz")), json.loads(Path(f"{result}.rank{rank}.json").read_text())


def test_collectives_give_numpy_results_for_several_dtypes_and_shapes(tmp_path):
    done = launch([{"kind": "collectives", "result": str(tmp_path / "c")}])
    assert done.returncode == 0, done.stderr
    inputs = [worker.reference_inputs(rank) for rank in (0, 1)]
    for rank in (0, 1):
        got, report = outcome(tmp_path / "c", rank)
        assert report == {"object": {"from": 1}, "world_size": 2, "writes": None, "backend": "mpi"}
        for key in inputs[0]:
            stacked = numpy.stack([inputs[0][key], inputs[1][key]])
            expected = {"sum": stacked.sum(0, dtype=stacked.dtype), "max": stacked.max(0), "min": stacked.min(0),
                        "broadcast": inputs[1][key]}
            for op, value in expected.items():
                assert got[f"{key}/{op}"].dtype == value.dtype and got[f"{key}/{op}"].shape == value.shape
                numpy.testing.assert_array_equal(got[f"{key}/{op}"], value, err_msg=f"{key} {op} on rank {rank}")


EQUIVALENCE = [  # 20 steps each; n and batch chosen so epochs end in a short batch
    {"model": "mlp", "n": 128, "batch": 32},  # even
    {"model": "mlp", "n": 120, "batch": 25},  # odd: ranks take 12 and 13
    {"model": "mlp", "n": 81, "batch": 40, "optimizer": ["adam", 1e-3]},  # a batch of 1: rank 0 has no sample
    # LeNet in float64: in float32 a rounding difference of 1e-7 between the two sums can flip a max-pool
    # choice between two near-equal inputs, which 20 steps of SGD then grow to 1e-3 (seen at step 17 to 20)
    {"model": "cnn", "n": 90, "batch": 25, "dtype": "float64"},
    {"model": "graph", "n": 120, "batch": 25, "optimizer": ["adam", 1e-3]},  # a gn.Model with a shared layer
]


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("equivalence")
    jobs = [{"kind": "train", "steps": 20, "result": str(folder / f"job{i}"), **job}
            for i, job in enumerate(EQUIVALENCE)]
    done = launch(jobs)
    assert done.returncode == 0, done.stderr
    return jobs


@pytest.mark.parametrize("which", range(len(EQUIVALENCE)),
                         ids=[f"{j['model']}-n{j['n']}-batch{j['batch']}" for j in EQUIVALENCE])
def test_two_ranks_equal_one_process_on_every_parameter(equivalence_runs, which):
    job = equivalence_runs[which]
    expected, single = worker.train(job)  # one process, the whole batch
    for rank in (0, 1):
        got, report = outcome(job["result"], rank)
        assert report["world_size"] == 2 and report["last_step"] == 20
        worst = max(relative_difference(got[name], expected[name]) for name in expected)
        assert worst <= (1e-12 if job.get("dtype") == "float64" else 1e-6), f"rank {rank}: largest per-tensor difference {worst:.2e}"
        assert report["train_loss"] == pytest.approx(single["train_loss"], rel=1e-6)


def test_only_rank_zero_writes_and_every_rank_stops_early_at_the_same_step(tmp_path):
    job = {"kind": "train", "model": "mlp", "n": 96, "batch": 16, "steps": 40, "val": 50, "eval_every": 2,
           "early_stopping": 2, "optimizer": ["sgd", 0.3], "out": str(tmp_path / "run"), "watch": True,
           "result": str(tmp_path / "r"), "restore_best": True}
    done = launch([job])
    assert done.returncode == 0, done.stderr
    reports = [outcome(job["result"], rank)[1] for rank in (0, 1)]
    best = gn.training.checkpoint.read_checkpoint(tmp_path / "run" / "model.safetensors")[0]
    for rank in (0, 1):  # every rank ends with the best model rank 0 saved
        params = outcome(job["result"], rank)[0]
        assert all(numpy.array_equal(params[k], best[k]) for k in params), rank
    single = worker.train({**job, "out": None})[1]
    assert reports[0]["last_step"] == reports[1]["last_step"] == single["last_step"] < 40  # stopped early
    assert reports[0]["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)
    assert reports[1]["writes"] == [] and reports[1]["written"] == []
    assert any("history.json" in w for w in reports[0]["writes"])
    assert {"history.json", "last.safetensors", "model.safetensors"} <= {p.name for p in (tmp_path / "run").iterdir()}
    records = json.loads((tmp_path / "run" / "history.json").read_text())
    assert records and all(r["world_size"] == 2 for r in records)


def test_a_resumed_two_rank_run_equals_an_uninterrupted_one(tmp_path):
    base = {"kind": "train", "model": "mlp", "n": 100, "batch": 24, "eval_every": 4, "optimizer": ["adam", 1e-3]}
    jobs = [{**base, "steps": 12, "out": str(tmp_path / "whole"), "result": str(tmp_path / "whole")},
            {**base, "steps": 6, "out": str(tmp_path / "parts"), "result": str(tmp_path / "first")},
            {**base, "steps": 12, "out": str(tmp_path / "parts"), "resume": True, "result": str(tmp_path / "parts")}]
    done = launch(jobs)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        whole, parts = outcome(tmp_path / "whole", rank)[0], outcome(tmp_path / "parts", rank)[0]
        for name in whole:
            numpy.testing.assert_array_equal(parts[name], whole[name], err_msg=f"{name} on rank {rank}")
    records = json.loads((tmp_path / "parts" / "history.json").read_text())
    assert [r["step"] for r in records] == [4, 6, 8, 12]  # 6: the end of the first part


def test_a_rank_that_raises_ends_the_job_with_its_message_within_seconds(tmp_path):
    job = {"kind": "train", "model": "mlp", "n": 64, "batch": 16, "steps": 200, "fail": [1, 5],
           "result": str(tmp_path / "f")}
    started = time.monotonic()
    done = launch([job])
    took = time.monotonic() - started
    assert done.returncode != 0
    assert "rank 1 of 2 failed: bad training sample" in done.stderr
    assert took < 20, f"the job took {took:.1f} s to end"


def test_a_collective_that_waits_too_long_raises_naming_itself(tmp_path):
    done = launch([{"kind": "late", "result": str(tmp_path / "t")}])
    assert done.returncode == 0, done.stderr
    report = outcome(tmp_path / "t", 0)[1]
    assert report["message"] == ("rank 0: all_reduce of 4 float64 waited 0.5 s for the other ranks of 2; one of "
                                 "them is stuck or has died")
    assert 0.5 <= report["waited"] < 1.9
    assert outcome(tmp_path / "t", 1)[1]["message"] is None


def gpunet_on_two_ranks(*args) -> subprocess.CompletedProcess:
    env = launch_environment()
    return subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "gpunet", *args], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, env=env)


def test_gpunet_train_under_mpiexec_needs_no_new_flag(tmp_path):
    done = gpunet_on_two_ranks("train", "--model", "mlp", "--steps", "2", "--device", "cpu", "--no-progress",
                               "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("world size: 2 (mpi)") == 1 and done.stdout.count("final: step 2") == 1  # rank 0 only
    records = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["world_size"] for r in records] == [2]


def test_gpunet_train_failing_on_rank_zero_alone_ends_the_job(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    started = time.monotonic()
    done = gpunet_on_two_ranks("train", "--model", "mlp", "--steps", "2", "--device", "cpu",
                               "--out", str(tmp_path / "file"))  # only rank 0 makes the folder, so only it fails
    assert done.returncode != 0
    assert f"gpunet train: --out {tmp_path / 'file'} is a file, not a folder" in done.stderr
    assert time.monotonic() - started < 20


@pytest.mark.gpu
def test_two_gpu_ranks_through_mpi_host_copies_equal_one_gpu_process(tmp_path):
    """The fallback where NCCL is not usable (the stand-in's cupy.cuda.nccl.available is False, as with
    CuPy's [ctk] extra: cupyx.distributed imports, its init_process_group would raise "NCCL is not
    available"; on a real one-GPU machine both ranks share the device): gradients go through host
    copies and MPI, said in one line by rank 0."""
    job = {"kind": "train", "model": "mlp", "n": 60, "batch": 25, "steps": 10, "device": "gpu",
           "result": str(tmp_path / "g")}
    done = launch([job])
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("gpunet: NCCL is not usable (CuPy cannot load its library; CuPy's [ctk] extra ships none); "
                             "the 2 ranks' collectives go through MPI with host copies (slower)\n") == 1, done.stderr
    expected, single = worker.train(job)
    for rank in (0, 1):
        got, report = outcome(job["result"], rank)
        assert report["world_size"] == 2 and report["last_step"] == 10 and report["backend"] == "mpi"
        worst = max(relative_difference(got[name], expected[name]) for name in expected)
        assert worst <= (1e-12 if job.get("dtype") == "float64" else 1e-6), f"rank {rank}: largest per-tensor difference {worst:.2e}"
