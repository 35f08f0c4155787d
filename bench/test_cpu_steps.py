"""CPU training steps, gpunet beside PyTorch in the same run: `pytest bench/ --benchmark-only`."""
from __future__ import annotations

import pytest

from gpunet.benchmarks.steps import first_losses, mlp_steps

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def mlp():
    ours, theirs = mlp_steps()
    for a, b in first_losses(ours, theirs):
        assert abs(a - b) <= 1e-4 * abs(b), (a, b)
    return ours, theirs


@pytest.mark.benchmark(group="mlp-784-300-100-10-b128-sgd-momentum")
def test_mlp_step_gpunet(benchmark, mlp):
    benchmark.pedantic(mlp[0], rounds=200, iterations=1, warmup_rounds=20)


@pytest.mark.benchmark(group="mlp-784-300-100-10-b128-sgd-momentum")
def test_mlp_step_torch(benchmark, mlp):
    benchmark.pedantic(mlp[1], rounds=200, iterations=1, warmup_rounds=20)
