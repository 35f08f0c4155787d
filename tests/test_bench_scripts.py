"""bench/gemm_floor.py records the GEMMs of a training step and replays them on both sides.
(Its timings are measurements for bench/RESULTS.md, never asserted here.)"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy
import pytest

from gpunet.benchmarks import steps
from tests.support.tolerance import assert_within, matmul_atol


def _gemm_floor():
    path = Path(__file__).resolve().parents[1] / "bench" / "gemm_floor.py"
    spec = importlib.util.spec_from_file_location("gemm_floor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_records_every_gemm_of_an_mlp_step_and_replays_them_in_both_libraries():
    floor = _gemm_floor()
    ours, _ = steps.mlp_steps(batch=16, sizes=(20, 12, 8, 4))
    ours()
    real = numpy.matmul
    calls = floor.record_matmuls(ours)
    assert numpy.matmul is real
    shapes = sorted((a.shape, b.shape) for a, b, _ in calls)
    forward = [((16, 20), (20, 12)), ((16, 12), (12, 8)), ((16, 8), (8, 4))]
    weight_grads = [((12, 16), (16, 20)), ((8, 16), (16, 12)), ((4, 16), (16, 8))]
    input_grads = [((16, 8), (8, 12)), ((16, 4), (4, 8))]  # none for the first layer
    assert shapes == sorted(forward + weight_grads + input_grads)
    mine, theirs = floor.replay_numpy(calls)(), floor.replay_torch(calls)()
    for (a, b, _), product, other in zip(calls, mine, theirs):
        expected = a.astype(numpy.float64) @ b.astype(numpy.float64)
        bound = matmul_atol(a, b)  # both sides' float32 product against float64: within it
        assert_within(product, expected, bound, f"numpy {a.shape} @ {b.shape}")
        assert_within(other.numpy(), expected, bound, f"torch {a.shape} @ {b.shape}")


def test_restores_numpy_matmul_when_the_step_fails():
    floor = _gemm_floor()
    real = numpy.matmul

    def failing_step():
        numpy.matmul(numpy.ones((2, 2)), numpy.ones((2, 2)))
        raise RuntimeError("step failed")
    with pytest.raises(RuntimeError, match="step failed"):
        floor.record_matmuls(failing_step)
    assert numpy.matmul is real
