"""Same seed, two devices: the training trajectories of every model agree (dropout included).
On a machine without a GPU the harness itself is checked by comparing the CPU with itself."""
from __future__ import annotations

import pytest

import gpunet as gn
from gpunet import parity
from gpunet.cli import main

MODELS = ["mlp", "cnn", "rnn", "transformer"]


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
def test_cpu_and_gpu_trajectories_agree(model):
    report = parity.compare(model, steps=50, devices=("cpu", "gpu"), batch_size=16)
    for step, (cpu, gpu) in enumerate(report["losses"], 1):
        assert abs(cpu - gpu) <= 1e-4 * abs(cpu), f"step {step}: cpu {cpu}, gpu {gpu}"


@pytest.mark.parametrize("model", MODELS)
def test_the_same_device_gives_identical_trajectories(model):
    report = parity.compare(model, steps=3, devices=("cpu", "cpu"), batch_size=4)
    assert all(a == b for a, b in report["losses"])
    assert max(report["activation_diff"]) == 0.0 and max(report["grad_diff"].values()) == 0.0
    assert len(report["layers"]) == len(report["activation_diff"]) and report["grad_diff"]
    text = parity.format_report(report)
    assert "layer activations:" in text and "loss on cpu" in text


def test_relative_difference():
    import numpy
    assert parity.relative_difference(numpy.array([1.0, 2.0]), numpy.array([1.0, 4.0])) == pytest.approx(0.5)


def test_parity_without_a_gpu_says_why():
    if gn.has_gpu():
        pytest.skip("a GPU is usable here")
    with pytest.raises(SystemExit, match="no GPU is usable: "):
        main(["parity", "--model", "mlp", "--steps", "2"])
