"""A gn.Model trains as a Sequential does: CUDA-graph replay equal to eager training on the stand-in
GPU, and the same step on the CPU and the GPU."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L
from tests.test_cuda_graph import assert_same, train


def residual_mlp():
    """784 -> 32, a residual block, a batch norm, a head: fused chains included. fc2 has no bias: a batch norm
    after it would make its gradient zero up to rounding, which no relative comparison can bound."""
    x = gn.Input((784,))
    h = L.ReLU()(L.Dense(784, 32, name="stem")(x))
    r = L.Dense(32, 32, bias=False, name="fc2")(L.ReLU()(L.Dense(32, 32, name="fc1")(h)))
    h = L.ReLU()(L.BatchNorm1d(32)(L.Add()([h, r])))
    return gn.Model(x, L.Dense(32, 10, name="head")(h))


@pytest.mark.gpu
def test_a_graph_model_replayed_trains_as_eagerly():
    eager, eager_history, _ = train(False, model=residual_mlp)
    replayed, history, said = train(True, model=residual_mlp)
    assert said == []  # captured, not refused
    assert_same(replayed, eager)
    assert history["train_loss"] == pytest.approx(eager_history["train_loss"], rel=1e-6)


@pytest.mark.gpu
def test_a_graph_models_step_on_the_gpu_is_the_cpus_within_the_parity_bound():
    from gpunet.parity import relative_difference
    from gpunet.parity_bound import step_bound
    r = numpy.random.default_rng(0)
    x, y = r.random((64, 784), dtype=numpy.float32), r.integers(0, 10, 64)
    results = []
    for device in ("cpu", "gpu"):
        gn.manual_seed(0)
        model = residual_mlp().to(device)
        gn.fit(model, (x, y), optimizer=gn.optim.SGD(model, lr=0.1), steps=1, batch_size=64, progress=False,
               log=lambda *a: None)
        results.append({k: gn.to_numpy(v) for k, v in model.grads.items()})
    model = residual_mlp()
    bound = step_bound([model], (64, 784), 10)  # the graph's sums: every node's path, then the loss's
    worst = max(relative_difference(results[1][k], results[0][k]) for k in results[0])
    assert worst <= bound, f"largest gradient difference {worst:.2e} > bound {bound:.2e}"
