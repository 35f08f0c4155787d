"""The measurements of `gpunet bench` as pytest-benchmark suites: `pytest bench/ --benchmark-only`.

Every case of gpunet.benchmarks.runner.cases, on the CPU and, where one is usable, the GPU; each
pair is checked to compute the same thing before either side is timed. Unlike `gpunet bench`,
pytest-benchmark times each side's rounds back to back; bench/conftest.py prints the ratios.
"""
from __future__ import annotations

import time

import pytest

import gpunet as gn
from gpunet.benchmarks import runner

torch = pytest.importorskip("torch")

DEVICES = ["cpu"] + (["gpu"] if gn.has_gpu() else [])
CASES = [(device, case.name) for device in DEVICES for case in runner.cases(device)]
_built = {}


def pair(device, name):
    if (device, name) not in _built:
        case = next(c for c in runner.cases(device) if c.name == name)
        built = case.build()
        runner.check_agreement(name, built)
        _built[device, name] = built
    return _built[device, name]


@pytest.mark.parametrize("side", ["gpunet", "torch"])  # the innermost: each case's two sides run one after the other
@pytest.mark.parametrize("device, name", CASES, ids=[f"{d}-{n}" for d, n in CASES])
def test_case(benchmark, device, name, side):
    built = pair(device, name)
    fn = built.ours if side == "gpunet" else built.theirs
    sync = runner.synchroniser(device)

    def call():
        fn()
        sync()

    time.sleep(runner.SETTLE_SECONDS)  # the previous case's worker threads park (runner.SETTLE_SECONDS says why)
    benchmark.group = f"{device}:{name}"
    benchmark.name = f"{device}:{name}[{side}]"
    benchmark.pedantic(call, rounds=max(3, min(100, int(1.0 / _seconds(call)))), iterations=1, warmup_rounds=2)


def _seconds(call) -> float:
    call()
    start = time.perf_counter()
    call()
    return max(time.perf_counter() - start, 1e-6)
