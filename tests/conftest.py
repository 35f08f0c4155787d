"""Shared fixtures: every device-parametrized test runs on the CPU and, where one is usable,
on the GPU (marked `gpu`, skipped cleanly otherwise)."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if gn.has_gpu():
        return
    reason = gn.backend.gpu_status()[1]
    skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    gn.manual_seed(1234)
    yield


def on(device, a):
    """An array on the device (host NumPy input)."""
    return gn.backend.to_device(numpy.asarray(a), device)


def rng(seed=0):
    return numpy.random.default_rng(seed)
