"""`gpunet bench --ranks N`: data-parallel training throughput (samples/s) at 1 and N ranks, on the CPU
through mpiexec (the `mpi` extra). Each measurement is its own `mpiexec -n K python -m
gpunet.benchmarks.scaling MODEL STEPS BATCH` job; rank 0 prints one JSON line.

The global batch stays the same at every rank count (each rank takes 1/K of it), as in training.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy

MODELS = {"mlp": 128, "cnn": 64}  # the recipes' global batch sizes


def run(ranks: int, steps: int = 100, models=tuple(MODELS)) -> list[dict]:
    """One row per model: samples/s at 1 and at `ranks` ranks, the speed-up and the scaling efficiency."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise ValueError("--ranks needs mpiexec on PATH: pip install 'gpunet[mpi]' (mpi4py and the MPICH wheel)")
    rows = []
    for model in models:
        env = _threads_per_rank(ranks)
        rates = {k: _measure(mpiexec, k, model, steps, MODELS[model], env) for k in sorted({1, ranks})}
        speedup = rates[ranks] / rates[1]
        rows.append({"model": model, "batch": MODELS[model], "steps": steps, "ranks": ranks,
                     "samples_per_s_1": rates[1], f"samples_per_s_{ranks}": rates[ranks], "speedup": speedup,
                     "efficiency": speedup / ranks})
    return rows


def _measure(mpiexec: str, ranks: int, model: str, steps: int, batch: int, env: dict) -> float:
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "gpunet.benchmarks.scaling", model, str(steps),
               str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise ValueError(f"{' '.join(command)} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"])


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _threads_per_rank(ranks: int) -> dict:
    """The environment of every job: each rank gets cores // ranks BLAS and Numba threads, at 1 rank too, so
    the speed-up measures the ranks alone (N ranks each running every core's threads would oversubscribe
    the cores); variables the user set are kept."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    for name in THREAD_VARIABLES:
        env.setdefault(name, threads)
    return env


def table(rows: list[dict]) -> str:
    ranks = rows[0]["ranks"] if rows else 0
    lines = [f"{'model':6} {'batch':>5} {'1 rank':>12} {f'{ranks} ranks':>12} {'speed-up':>9} {'efficiency':>10}"]
    for r in rows:
        lines.append(f"{r['model']:6} {r['batch']:5d} {r['samples_per_s_1']:10.0f}/s "
                     f"{r[f'samples_per_s_{ranks}']:10.0f}/s {r['speedup']:8.2f}x {r['efficiency']:9.0%}")
    return "\n".join(lines)


def _worker(model: str, steps: int, batch: int) -> None:
    """One rank of a measurement: synthetic MNIST-sized data, SGD, a warm-up, then `steps` timed steps."""
    import gpunet as gn
    from gpunet import distributed

    world = distributed.init("cpu")
    rng = numpy.random.default_rng(0)
    x = rng.normal(size=(4096, 784) if model == "mlp" else (4096, 1, 28, 28)).astype("float32")
    y = rng.integers(0, 10, size=4096)
    gn.manual_seed(0)
    net = gn.models.mlp((784, 300, 100, 10)) if model == "mlp" else gn.models.lenet(10)
    optimizer = gn.optim.SGD(net, lr=0.01, momentum=0.9)
    gn.fit(net, (x, y), optimizer=optimizer, steps=3, batch_size=batch, progress=False)  # warm-up (Numba, caches)
    world.barrier()
    started = time.perf_counter()
    gn.fit(net, (x, y), optimizer=optimizer, steps=steps, batch_size=batch, progress=False)
    world.barrier()
    seconds = time.perf_counter() - started
    if world.rank == 0:
        print(json.dumps({"model": model, "ranks": world.world_size, "samples_per_s": steps * batch / seconds}))


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
