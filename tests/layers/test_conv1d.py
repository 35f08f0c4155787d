"""Conv1D, the layer the README's "Writing a layer" builds: parity with torch.nn.Conv1d on every
device, float64 finite differences, checkpoints, and the errors it gives."""
from __future__ import annotations

import re

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from tests.support.arrays import on, rng
from tests.support.gradcheck import check_layer
from tests.support.reference import compare_with_torch
from tests.support.tolerance import assert_within, layer_atol

CONFIGS = [  # in, out, kernel, stride, padding, dilation, bias; input (N, C, L)
    ((3, 4, 3, 1, 0, 1, True), (2, 3, 9)),
    ((2, 5, 4, 2, 1, 1, True), (3, 2, 11)),
    ((3, 2, 3, 1, 2, 2, False), (2, 3, 7)),
    ((1, 3, 5, 3, 2, 2, True), (1, 1, 16)),
    ((4, 6, 1, 1, 0, 1, True), (2, 4, 5)),  # a 1x1 convolution: a Dense over channels
]


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_matches_torch_conv1d(config, shape, device):
    layer = L.Conv1D(*config)
    c_in, c_out, k, stride, padding, dilation, bias = config
    module = torch.nn.Conv1d(c_in, c_out, k, stride, padding, dilation, bias=bias)
    assert list(layer.state_dict()) == list(module.state_dict()), "parameter names and order follow PyTorch"
    compare_with_torch(layer, module, rng(1).standard_normal(shape).astype("float32"), device)


@pytest.mark.parametrize("config, shape", CONFIGS)
def test_gradients_match_finite_differences(config, shape):
    check_layer(L.Conv1D(*config), rng(2).standard_normal(shape))


def test_backward_params_gives_the_same_parameter_gradients(device):
    layer = L.Conv1D(2, 3, 3, padding=1).to(device)
    x, dy = on(device, rng(1).standard_normal((2, 2, 6)).astype("float32")), None
    y = layer.forward(x)
    dy = on(device, rng(2).standard_normal(y.shape).astype("float32"))
    layer.backward(dy)
    full = {k: gn.to_numpy(v).copy() for k, v in layer.grads.items()}
    assert layer.backward_params(dy) is None
    for name, grad in full.items():
        # the same dW and db ops as backward (only dx is skipped), in the same order on each device:
        # no sum's bound is needed; 1e-6 (16 u) is no more than a rounding
        numpy.testing.assert_allclose(gn.to_numpy(layer.grads[name]), grad, rtol=1e-6, err_msg=name)


def test_checkpoint_round_trip(tmp_path):
    model = gn.Sequential(L.Conv1D(2, 4, 3, padding=1, dilation=2), L.ReLU(), L.Flatten(), L.Dense(4 * 3, 3))
    gn.save(model, tmp_path / "conv1d.safetensors")
    loaded = gn.load(tmp_path / "conv1d.safetensors")
    assert repr(loaded[0]) == "Conv1D(in_channels=2, out_channels=4, kernel_size=3, stride=1, padding=1, " \
                              "dilation=2, bias=True)"
    x = rng().standard_normal((2, 2, 5)).astype("float32")
    numpy.testing.assert_array_equal(loaded.forward(x), model.forward(x))


@pytest.mark.parametrize("layer, shape, message", [
    (L.Conv1D(3, 4, 3), (2, 3, 8, 1), "expected input of shape (N, C, L), got shape (2, 3, 8, 1)"),
    (L.Conv1D(3, 4, 3), (2, 2, 8), "expected 3 input channels, got shape (2, 2, 8)"),
    (L.Conv1D(1, 4, 3, dilation=3), (1, 1, 6), "input length 6 is shorter than the kernel's reach 7"),
])
def test_bad_inputs_name_the_layer_and_the_shape(layer, shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        layer.forward(numpy.zeros(shape, "float32"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="Conv1D: sizes, stride and dilation must be positive"):
        L.Conv1D(2, 3, 3, stride=0)


def test_the_readme_shows_the_layer_as_it_is():
    from pathlib import Path
    root = Path(__file__).parents[2]
    source = (root / "src/gpunet/layers/conv1d.py").read_text().splitlines()
    readme = (root / "README.md").read_text()
    start = source.index('@register("Conv1D")')
    end = source.index("    def _taps(self, length: int):") - 1  # the blank line before it
    assert (len(source), start, end - start) == (75, 14, 30), "update the counts in README's 'Writing a layer'"
    assert "\n".join(source[start:end]) in readme


def test_a_model_with_conv1d_has_a_pytorch_twin_with_the_same_output():
    from gpunet.benchmarks.twins import torch_twin

    model = gn.Sequential(gn.layers.Conv1D(3, 4, 3, stride=2, padding=1, dilation=2), gn.layers.Flatten(),
                          gn.layers.Dense(4 * 4, 2))
    x = numpy.random.default_rng(0).standard_normal((2, 3, 10)).astype("float32")
    with torch.no_grad():
        want = torch_twin(model)(torch.from_numpy(x)).numpy()
    assert_within(model.forward(x), want, layer_atol(model, x.shape, want), "output")
