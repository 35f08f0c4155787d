"""What every test module may import: the devices a test runs on, arrays placed on one, seeded
generators, and whether the GPU under test is the CuPy stand-in."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from tests import gpu_standin

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]
GPU = gpu_standin.activate()  # "real", "standin", or why neither can run
ON_STANDIN = GPU == "standin"


def on(device, a):
    """An array on the device (host NumPy input)."""
    return gn.backend.to_device(numpy.asarray(a), device)


def rng(seed=0):
    return numpy.random.default_rng(seed)
