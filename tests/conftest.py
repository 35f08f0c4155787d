"""Shared fixtures: every device-parametrized test runs on the CPU and on the GPU (marked `gpu`):
a real one when usable, else the CuPy stand-in (tests/gpu_standin), whose kernels run in the
emulator; with GPUNET_REQUIRE_GPU=1, a real one or every gpu test fails with the reason. Tests
marked `real_gpu(reason=...)` need real cuBLAS numerics or timing and run only on a real GPU."""
from __future__ import annotations

import os
import tempfile
import time

import pytest

import gpunet as gn

# GEMM choices measured by the tests (on the stand-in: meaningless timings) never reach the user's cache.
os.environ["GPUNET_CACHE"] = tempfile.mkdtemp(prefix="gpunet-test-cache-")
from tests import gpu_standin  # noqa: E402
from tests.support.arrays import DEVICES, GPU, ON_STANDIN  # noqa: E402  (activates the stand-in)


def pytest_report_header(config):
    kinds = {"real": "a real GPU", "standin": "the CuPy stand-in (kernels in the CPU emulator)"}
    return f"gpu tests run on: {kinds.get(GPU, 'nothing: ' + GPU)}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if GPU not in ("real", "standin") and not gpu_standin.required():
            item.add_marker(pytest.mark.skip(reason=f"no usable GPU and no stand-in: {GPU}"))
        elif ON_STANDIN and (marker := item.get_closest_marker("real_gpu")):
            item.add_marker(pytest.mark.skip(reason=f"needs a real GPU: {marker.kwargs['reason']}"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Under GPUNET_REQUIRE_GPU=1 without a usable real GPU, a gpu test fails at once with the
    reason, running none of its fixtures: a GPU check never passes, or skips, on the stand-in."""
    if GPU == "real" or "gpu" not in item.keywords or not gpu_standin.required():
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    now = time.time()
    for when, outcome in (("setup", "passed"), ("call", "failed"), ("teardown", "passed")):
        item.ihook.pytest_runtest_logreport(report=pytest.TestReport(
            item.nodeid, item.location, {k: 1 for k in item.keywords}, outcome,
            GPU if outcome == "failed" else None, when, start=now, stop=now))
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    gn.manual_seed(1234)
    gn.random.set_step(0)  # dropout masks: the step is global too
    yield
