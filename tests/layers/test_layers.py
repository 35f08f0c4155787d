"""Layers: float64 gradient checks on the CPU, float32 parity with PyTorch on every device."""
from __future__ import annotations

import re

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from tests.support.arrays import on, rng
from tests.support.gradcheck import check_layer
from tests.support.reference import run_both
from tests.support.tolerance import assert_within, layer_atol

# ------------------------------------------------------------------ gradient checks (float64)

GRADCHECK_CASES = {
    "dense": (lambda: L.Dense(7, 5), (4, 7)),
    "dense_3d_input": (lambda: L.Dense(6, 3), (2, 5, 6)),
    "dense_no_bias": (lambda: L.Dense(6, 4, bias=False), (3, 6)),
    "dense_fused_relu": (lambda: L.Dense(6, 4, activation="relu"), (5, 6)),
    "dense_fused_gelu": (lambda: L.Dense(6, 4, activation="gelu"), (5, 6)),
    "dense_fused_sigmoid": (lambda: L.Dense(6, 4, activation="sigmoid"), (5, 6)),
    "relu": (L.ReLU, (4, 9)),
    "sigmoid": (L.Sigmoid, (4, 9)),
    "tanh": (L.Tanh, (4, 9)),
    "gelu": (L.GELU, (4, 9)),
    "gelu_tanh": (lambda: L.GELU("tanh"), (4, 9)),
    "softmax": (L.Softmax, (3, 6)),
    "dropout": (lambda: L.Dropout(0.3), (6, 8)),
    "batchnorm1d_train": (lambda: L.BatchNorm1d(5), (8, 5)),
    "batchnorm1d_3d": (lambda: L.BatchNorm1d(3), (4, 3, 6)),
    "batchnorm1d_eval": (lambda: L.BatchNorm1d(5).eval(), (8, 5)),
    "layernorm": (lambda: L.LayerNorm(6), (3, 4, 6)),
    "flatten": (L.Flatten, (2, 3, 4)),
    "sequential": (lambda: gn.Sequential(L.Dense(5, 8), L.Tanh(), L.Dropout(0.2), L.BatchNorm1d(8),
                                         L.Dense(8, 3), L.Softmax()), (6, 5)),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradients_match_finite_differences(case):
    make, shape = GRADCHECK_CASES[case]
    layer = make()
    if case == "batchnorm1d_eval":  # give the running statistics non-trivial values
        layer.buffers["running_mean"][...] = rng().standard_normal(5)
        layer.buffers["running_var"][...] = rng().uniform(0.5, 2.0, 5)
    x = rng(3).standard_normal(shape) * 1.5
    check_layer(layer, x)


# ------------------------------------------------------------------ parity with PyTorch (float32)

def torch_twin(name):
    return {
        "dense": (lambda: L.Dense(20, 13), lambda: torch.nn.Linear(20, 13), (9, 20)),
        "dense_3d": (lambda: L.Dense(16, 8), lambda: torch.nn.Linear(16, 8), (3, 5, 16)),
        "relu": (L.ReLU, torch.nn.ReLU, (7, 11)),
        "sigmoid": (L.Sigmoid, torch.nn.Sigmoid, (7, 11)),
        "tanh": (L.Tanh, torch.nn.Tanh, (7, 11)),
        "gelu": (L.GELU, torch.nn.GELU, (7, 11)),
        "gelu_tanh": (lambda: L.GELU("tanh"), lambda: torch.nn.GELU("tanh"), (7, 11)),
        "softmax": (L.Softmax, lambda: torch.nn.Softmax(dim=-1), (7, 11)),
        "batchnorm1d": (lambda: L.BatchNorm1d(6), lambda: torch.nn.BatchNorm1d(6), (10, 6)),
        "batchnorm1d_3d": (lambda: L.BatchNorm1d(4), lambda: torch.nn.BatchNorm1d(4), (5, 4, 7)),
        "layernorm": (lambda: L.LayerNorm(12), lambda: torch.nn.LayerNorm(12), (4, 3, 12)),
        "flatten": (L.Flatten, torch.nn.Flatten, (3, 4, 5)),
        "sequential": (lambda: gn.Sequential(L.Dense(10, 16), L.ReLU(), L.BatchNorm1d(16), L.Dense(16, 4)),
                       lambda: torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(),
                                                   torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)), (8, 10)),
    }[name]


def randomise(layer):
    """Non-trivial affine parameters so that parity tests exercise them."""
    for name, value in layer.params.items():
        value[...] = gn.to_numpy(value) + rng(len(name)).uniform(-0.5, 0.5, value.shape).astype(value.dtype)


def copy_to_torch(layer, module):
    state = {k: torch.from_numpy(numpy.array(gn.to_numpy(v))) for k, v in layer.state_dict().items()}
    module.load_state_dict(state)


@pytest.mark.parametrize("name", ["dense", "dense_3d", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "softmax",
                                  "batchnorm1d", "batchnorm1d_3d", "layernorm", "flatten", "sequential"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_pytorch(name, mode, device):
    make, make_torch, shape = torch_twin(name)
    layer, module = make(), make_torch()
    randomise(layer)
    assert set(layer.state_dict()) == set(module.state_dict()), "parameter names must follow PyTorch"
    copy_to_torch(layer, module)
    if mode == "eval":
        for bn in [layer] + list(getattr(layer, "layers", [])):
            if "running_var" in bn.buffers:  # trained running statistics
                bn.buffers["running_mean"][...] = rng(5).standard_normal(bn.buffers["running_mean"].shape)
                bn.buffers["running_var"][...] = rng(6).uniform(0.5, 2, bn.buffers["running_var"].shape)
        copy_to_torch(layer, module)
        layer.eval(), module.eval()
    x = rng(1).standard_normal(shape).astype("float32") * 2
    run_both(layer, module, x, device)
    for key, buf in module.state_dict().items():  # running statistics after one training step
        want = buf.numpy()
        assert_within(gn.to_numpy(layer.state_dict()[key]), want, layer_atol(layer, x.shape, want), key)


def test_dropout_is_inverted_and_identity_in_eval(device):
    layer = L.Dropout(0.25).to(device)
    x = on(device, numpy.ones((400, 250), dtype="float32"))
    y = gn.to_numpy(layer.forward(x))
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    numpy.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)  # 1 / 0.75 rounded to float32 once: within 2^-24
    dx = gn.to_numpy(layer.backward(on(device, numpy.full((400, 250), 2.0, dtype="float32"))))
    numpy.testing.assert_allclose(dx, 2 * y)
    layer.eval()
    numpy.testing.assert_array_equal(gn.to_numpy(layer.forward(x)), gn.to_numpy(x))


def test_dropout_masks_repeat_with_the_seed():
    layer = L.Dropout(0.5)
    x = numpy.ones((10, 10), dtype="float32")
    gn.manual_seed(3)
    a = layer.forward(x)
    gn.manual_seed(3)
    numpy.testing.assert_array_equal(a, layer.forward(x))


def test_weights_move_both_ways_with_pytorch():
    model = gn.models.mlp((12, 8, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model.load_state_dict(twin.state_dict())  # torch -> gpunet
    x = rng().standard_normal((4, 12)).astype("float32")
    want = twin(torch.from_numpy(x)).detach().numpy()
    assert_within(model.forward(x), want, layer_atol(model, x.shape, want), "output")
    copy_to_torch(gn.models.mlp((12, 8, 3)), twin)  # gpunet -> torch, strict names and shapes


@pytest.mark.parametrize("layer, x, message", [
    (L.Dense(4, 3), numpy.zeros((2, 5), "float32"), "expected input with last dimension 4, got shape (2, 5)"),
    (L.Dense(4, 3), numpy.zeros((2, 4), "uint8"), "expected float32 input, got uint8"),
    (L.Dense(4, 3), numpy.zeros((2, 4), "float64"), "expected float32 input, got float64"),
    (L.BatchNorm1d(3), numpy.zeros((2, 4), "float32"), "expected 3 channels on axis 1"),
    (L.BatchNorm2d(3), numpy.zeros((2, 3), "float32"), "expected input of shape (N, C, H, W)"),
    (L.LayerNorm(6), numpy.zeros((2, 5), "float32"), "LayerNorm(normalized_shape=6"),
])
def test_bad_inputs_name_layer_and_shape(layer, x, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        layer.forward(x)


@pytest.mark.parametrize("make, shape", [(lambda: L.Dense(4, 3), (2, 4)),
                                         (lambda: L.MultiHeadAttention(4, 2), (2, 3, 4))], ids=["dense", "attention"])
def test_a_16bit_input_is_taken_only_in_mixed_precision(make, shape):
    """Dense and attention take the 16-bit copy of their input (a layer norm's for_product) in mixed precision,
    as the float32 input rounded; outside it a 16-bit input is refused in one line naming the layer and dtype."""
    import ml_dtypes

    from gpunet.backend import precision

    layer = make()
    x = rng(3).standard_normal(shape).astype("float32")
    with pytest.raises(TypeError, match=r"^" + re.escape(layer.describe()) + r": expected float32 input, got bfloat16$"):
        layer.forward(x.astype(ml_dtypes.bfloat16))
    with precision.using("bf16"):
        given = layer.forward(x.astype(ml_dtypes.bfloat16))
        want = layer.forward(x)
    numpy.testing.assert_array_equal(given, want)


def test_load_state_dict_rejects_wrong_shapes_and_names():
    model = gn.models.mlp((6, 4, 2))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 6\), got \(4, 5\)"):
        model.load_state_dict({**model.state_dict(), "0.weight": numpy.zeros((4, 5), "float32")})
    with pytest.raises(KeyError, match="missing"):
        model.load_state_dict({"0.weight": numpy.zeros((4, 6), "float32")})


def test_initialisers_follow_the_per_activation_scales():
    import math
    shape = (400, 600)
    bound = math.sqrt(6 / 1000)
    for activation, gain in (("tanh", 1.0), ("sigmoid", 4.0), ("relu", math.sqrt(2))):
        w = gn.init.xavier_uniform(shape, activation)
        assert w.dtype == numpy.float32
        assert abs(numpy.abs(w).max() - gain * bound) < 0.01 * gain * bound
        assert abs(w.std() - gain * bound / math.sqrt(3)) < 0.02 * gain * bound
        assert abs(gn.init.xavier_normal(shape, activation).std() - gain * math.sqrt(2 / 1000)) < 0.02 * gain
    assert abs(gn.init.kaiming_normal(shape).std() - math.sqrt(2 / 600)) < 1e-3
