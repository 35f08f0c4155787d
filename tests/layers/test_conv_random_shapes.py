"""Conv2D, pooling and BatchNorm2d against PyTorch over random configurations (hypothesis), on
every device. Its own file: the GPU machine's image has no hypothesis, and the other conv tests
must still run there."""
from __future__ import annotations

import pytest
import torch

from gpunet import layers as L
from tests.support.arrays import DEVICES, rng
from tests.support.reference import compare_with_torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (it is in the test extra)")
given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies


def torch_pair(kind, c_in, c_out, k, s, p):
    if kind == "conv":
        return L.Conv2D(c_in, c_out, k, stride=s, padding=p), torch.nn.Conv2d(c_in, c_out, k, stride=s, padding=p)
    if kind == "max":
        return L.MaxPool2D(k, stride=s), torch.nn.MaxPool2d(k, stride=s)
    if kind == "avg":
        return L.AvgPool2D(k, stride=s), torch.nn.AvgPool2d(k, stride=s)
    return L.BatchNorm2d(c_in), torch.nn.BatchNorm2d(c_in)


configs = st.fixed_dictionaries({
    "kind": st.sampled_from(["conv", "conv", "max", "avg", "bn"]),
    "n": st.integers(1, 3), "c_in": st.integers(1, 4), "c_out": st.integers(1, 5),
    "h": st.integers(7, 13), "w": st.integers(7, 13), "k": st.integers(1, 7),
    "s": st.integers(1, 3), "p": st.integers(0, 3),
})


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(cfg=configs)
def test_matches_pytorch_on_random_shapes(device, cfg):
    k, p = cfg["k"], min(cfg["p"], cfg["k"] // 2)
    if cfg["kind"] != "conv":
        k, p = min(k, 4), 0
    layer, module = torch_pair(cfg["kind"], cfg["c_in"], cfg["c_out"], k, cfg["s"], p)
    x = rng(cfg["h"] * cfg["w"]).standard_normal((cfg["n"], cfg["c_in"], cfg["h"], cfg["w"])).astype("float32")
    if cfg["kind"] == "bn" and cfg["n"] * cfg["h"] * cfg["w"] < 2:
        return
    compare_with_torch(layer, module, x, device)


