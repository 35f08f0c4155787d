"""Conv2D and pooling: finite differences, im2col/col2im adjointness, on every device (PyTorch
parity over random configurations is in test_conv_random_shapes.py)."""
from __future__ import annotations

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from gpunet.backend import ops_for_device
from gpunet.backend.ops import Ops
from tests.support.arrays import DEVICES, on, rng
from tests.support.gradcheck import check_layer
from tests.support.reference import compare_with_torch, recipe_accuracy_on_held_out_fifth
from tests.support.tolerance import assert_within, layer_atol


@pytest.mark.parametrize("make, shape", [
    (lambda: L.Conv2D(2, 3, 3), (2, 2, 5, 6)),
    (lambda: L.Conv2D(2, 3, (3, 2), stride=2, padding=1), (2, 2, 7, 5)),
    (lambda: L.Conv2D(1, 2, 5, padding=2, bias=False), (1, 1, 6, 6)),
    (lambda: L.MaxPool2D(2), (2, 3, 6, 4)),
    (lambda: L.MaxPool2D(3, stride=2), (1, 2, 7, 8)),
    (lambda: L.AvgPool2D(2), (2, 2, 4, 6)),
    (lambda: L.AvgPool2D((3, 2), stride=1), (1, 2, 5, 4)),
    (lambda: L.BatchNorm2d(3), (4, 3, 3, 2)),
    (lambda: L.BatchNorm2d(3).eval(), (4, 3, 3, 2)),
])
def test_gradients_match_finite_differences(make, shape):
    check_layer(make(), rng(2).standard_normal(shape))


def test_max_pool_ties_go_to_the_first_maximum_as_in_torch():
    x = numpy.zeros((1, 1, 4, 4), "float32")
    layer, module = L.MaxPool2D(2), torch.nn.MaxPool2d(2)
    compare_with_torch(layer, module, x, "cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 3, 9, 7), (3, 3), (1, 1), (1, 1)), ((1, 2, 8, 11), (5, 2), (2, 3), (2, 0)), ((3, 1, 5, 5), (1, 1), (2, 2), (0, 0))])
def test_im2col_and_col2im_are_adjoint(device, shape, kernel, stride, padding):
    ops = ops_for_device(device)
    x = rng(1).standard_normal(shape)
    cols = ops.im2col(on(device, x), kernel, stride, padding)
    c = rng(2).standard_normal(cols.shape)
    back = ops.col2im(on(device, c), shape, kernel, stride, padding)
    lhs = float((gn.to_numpy(cols) * c).sum())
    rhs = float((x * gn.to_numpy(back)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-10)
    base_cols = Ops().im2col(x, kernel, stride, padding)  # the xp reference
    numpy.testing.assert_array_equal(gn.to_numpy(cols), base_cols)
    # float64 sums of at most kh kw taps (u = 1.1e-16): 1e-12 is far above their rounding
    numpy.testing.assert_allclose(gn.to_numpy(back), Ops().col2im(c, shape, kernel, stride, padding), rtol=1e-12)


def test_lenet_names_match_the_torch_twin():
    twin = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(),
                               torch.nn.Linear(84, 10))
    model = gn.models.lenet()
    model.load_state_dict(twin.state_dict())
    x = rng().standard_normal((3, 1, 28, 28)).astype("float32")
    want = twin(torch.from_numpy(x)).detach().numpy()
    assert_within(model.forward(x), want, layer_atol(model, x.shape, want), "output")


def test_cnn_checkpoint_round_trip(tmp_path):
    model = gn.models.wide_cnn(width=4).eval()
    gn.save(model, tmp_path / "cnn.safetensors")
    loaded = gn.load(tmp_path / "cnn.safetensors").eval()
    x = rng().standard_normal((2, 1, 28, 28)).astype("float32")
    numpy.testing.assert_array_equal(loaded.forward(x), model.forward(x))


@pytest.mark.parametrize("layer, shape, message", [
    (L.Conv2D(3, 4, 3), (2, 3, 8), "expected input of shape (N, C, H, W), got shape (2, 3, 8)"),
    (L.Conv2D(3, 4, 3), (2, 2, 8, 8), "expected 3 input channels, got shape (2, 2, 8, 8)"),
    (L.Conv2D(1, 4, 5), (1, 1, 3, 3), "input 3x3 is smaller than the 5x5 window"),
    (L.MaxPool2D(4), (1, 1, 3, 8), "input 3x8 is smaller than the 4x4 window"),
])
def test_bad_conv_inputs(layer, shape, message):
    import re
    with pytest.raises(ValueError, match=re.escape(message)):
        layer.forward(numpy.zeros(shape, "float32"))


@pytest.mark.slow
def test_default_cnn_recipe_reaches_97_percent_on_held_out_fifth_of_the_sample():
    assert recipe_accuracy_on_held_out_fifth("cnn", epochs=8) >= 0.97  # 8 of the recipe's 15 epochs
