"""gn.export: to_torch gives a torch.nn.Module whose outputs match gpunet's for every layer type, and
from_torch(to_torch(model)) gives back the same weights, buffers and architecture. A merge layer takes a
list of arrays (its twin a list of tensors); a gn.Model with several inputs takes them as a list (its
twin as several arguments) and gives several outputs as a list (its twin a tuple). Graph models' own
tests (shared layers, nesting, gradients, ONNX with two inputs) are in tests/test_export_graph.py."""
from __future__ import annotations

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from gpunet.parity_bound import step_bound
from tests.support.tolerance import assert_within, layer_atol, ulps

R = numpy.random.default_rng(0)


def floats(*shape):
    return R.standard_normal(shape).astype("float32")


def ids(high, *shape):
    return R.integers(0, high, shape)


def randomised(layer):
    """Every parameter and float buffer drawn at random at the scale of its initialisation (so an
    identity-looking norm or a zero bias cannot hide a wrong mapping); running variances stay positive."""
    for name, value in layer.state_dict().items():
        if value.dtype.kind == "f":
            scale = float(value.std()) if value.size > 1 and value.std() > 0 else 0.5
            new = R.standard_normal(value.shape).astype(value.dtype) * scale
            layer.load_state_dict({name: numpy.abs(new) + 0.5 if "running_var" in name else new}, strict=False)
    return layer


def residual_graph():
    """A skip connection around a nested Sequential, joined by Add."""
    x = gn.Input((6,))
    h = gn.Sequential(L.Dense(6, 5), L.ReLU(), name="body")(x)
    return gn.Model(x, L.Dense(5, 3, name="head")(L.Add()([h, L.Dense(6, 5, name="skip")(x)])))


def two_input_graph():
    """Two inputs joined by Concatenate and Multiply; two outputs, one through a layer called twice."""
    a, b = gn.Input((6,)), gn.Input((4,))
    shared = L.Dense(4, 4, activation="tanh", name="shared")
    ha, hb = shared(L.Dense(6, 4)(a)), shared(b)
    return gn.Model([a, b], [L.Dense(8, 2, name="out")(L.Concatenate(axis=1)([ha, hb])), L.Multiply()([ha, hb])])


# every layer type gpunet.layers (and gpunet.models) registers, with an input for it
CASES = {
    "Dense": (lambda: L.Dense(6, 4), lambda: floats(3, 6)),
    "Dense_gelu": (lambda: L.Dense(6, 4, activation="gelu"), lambda: floats(3, 6)),
    "Dense_tanh_no_bias": (lambda: L.Dense(6, 4, bias=False, activation="tanh"), lambda: floats(2, 5, 6)),
    "Conv2D": (lambda: L.Conv2D(2, 3, 3, stride=2, padding=1), lambda: floats(2, 2, 7, 7)),
    "Conv2D_rect": (lambda: L.Conv2D(2, 3, (3, 2), stride=(1, 2), padding=(1, 0), bias=False),
                    lambda: floats(2, 2, 6, 6)),
    "Conv1D": (lambda: L.Conv1D(3, 4, 3, stride=2, padding=1, dilation=2), lambda: floats(2, 3, 11)),
    "MaxPool2D": (lambda: L.MaxPool2D(2), lambda: floats(2, 3, 6, 6)),
    "AvgPool2D": (lambda: L.AvgPool2D(3, stride=2), lambda: floats(2, 3, 7, 7)),
    "Flatten": (lambda: L.Flatten(), lambda: floats(2, 3, 4, 5)),
    "ReLU": (lambda: L.ReLU(), lambda: floats(4, 5)),
    "Sigmoid": (lambda: L.Sigmoid(), lambda: floats(4, 5)),
    "Tanh": (lambda: L.Tanh(), lambda: floats(4, 5)),
    "GELU": (lambda: L.GELU(), lambda: floats(4, 5)),
    "GELU_tanh": (lambda: L.GELU("tanh"), lambda: floats(4, 5)),
    "Softmax": (lambda: L.Softmax(dim=1), lambda: floats(3, 4, 5)),
    "Identity": (lambda: L.Identity(), lambda: floats(4, 5)),
    "Dropout": (lambda: L.Dropout(0.3), lambda: floats(4, 5)),
    "BatchNorm1d": (lambda: L.BatchNorm1d(5), lambda: floats(4, 5)),
    "BatchNorm1d_3d": (lambda: L.BatchNorm1d(3, affine=False), lambda: floats(4, 3, 6)),
    "BatchNorm2d": (lambda: L.BatchNorm2d(3), lambda: floats(2, 3, 4, 4)),
    "LayerNorm": (lambda: L.LayerNorm(6), lambda: floats(2, 3, 6)),
    "Embedding": (lambda: L.Embedding(10, 4), lambda: ids(10, 3, 5)),
    "PositionalEmbedding": (lambda: L.PositionalEmbedding(8, 4), lambda: floats(2, 5, 4)),
    "RNN": (lambda: L.RNN(4, 5), lambda: floats(2, 6, 4)),
    "LSTM": (lambda: L.LSTM(4, 5), lambda: floats(2, 6, 4)),
    "GRU": (lambda: L.GRU(4, 5), lambda: floats(2, 6, 4)),
    "GRU_no_bias": (lambda: L.GRU(4, 5, bias=False), lambda: floats(2, 6, 4)),
    "MultiHeadAttention": (lambda: L.MultiHeadAttention(8, 2), lambda: floats(2, 5, 8)),
    "MultiHeadAttention_causal": (lambda: L.MultiHeadAttention(8, 4, causal=True), lambda: floats(2, 5, 8)),
    "TransformerBlock": (lambda: L.TransformerBlock(8, 2, mlp_ratio=2, dropout=0.1), lambda: floats(2, 5, 8)),
    "Perceptron": (lambda: gn.models.Perceptron(6), lambda: floats(7, 6)),
    "Sequential_lenet": (lambda: gn.models.lenet(10), lambda: floats(2, 1, 28, 28)),
    "Sequential_wide_cnn": (lambda: gn.models.wide_cnn(10, width=4), lambda: floats(2, 1, 28, 28)),
    "Sequential_mlp_bn": (lambda: gn.models.mlp((6, 5, 3), batch_norm=True, dropout=0.2), lambda: floats(4, 6)),
    "Sequential_char_rnn": (lambda: gn.models.char_rnn(12, 6, 7, cell="gru", num_layers=2), lambda: ids(12, 2, 5)),
    "Sequential_transformer": (lambda: gn.models.transformer(12, context=8, d_model=8, num_heads=2, num_layers=2),
                               lambda: ids(12, 2, 8)),
    "Add": (lambda: L.Add(), lambda: [floats(3, 4), floats(3, 4), floats(3, 4)]),
    "Multiply": (lambda: L.Multiply(), lambda: [floats(2, 3, 4), floats(2, 3, 4)]),
    "Concatenate": (lambda: L.Concatenate(axis=1), lambda: [floats(2, 3, 4), floats(2, 1, 4)]),
    "Concatenate_last": (lambda: L.Concatenate(), lambda: [floats(3, 4), floats(3, 2)]),
    "Model_residual": (residual_graph, lambda: floats(4, 6)),
    "Model_two_inputs": (two_input_graph, lambda: [floats(3, 6), floats(3, 4)]),
}


def shape_of(x):
    """The input's shape; a tuple of shapes for a list of inputs (as gpunet.parity_bound takes them)."""
    return tuple(a.shape for a in x) if isinstance(x, list) else x.shape


def run_twin(module, model, x):
    """The twin's outputs as NumPy arrays, in a list: a gn.Model's inputs as several arguments, a merge
    layer's as one list."""
    tensors = [torch.from_numpy(a) for a in x] if isinstance(x, list) else torch.from_numpy(x)
    with torch.no_grad():
        y = module(*tensors) if isinstance(model, gn.Model) and isinstance(x, list) else module(tensors)
    return [t.numpy() for t in y] if isinstance(y, tuple) else [y.numpy()]


def listed(y) -> list:
    return list(y) if isinstance(y, list) else [y]


def test_every_registered_layer_type_is_covered():
    covered = {type(make()).__name__ for make, _ in CASES.values()}
    # gpunet's own types: other test modules register layers of their own (tests/test_check_layer.py)
    built_in = {name for name, cls in L.LAYER_TYPES.items() if cls.__module__.startswith("gpunet.")}
    assert built_in <= covered, sorted(built_in - covered)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_twin_computes_what_gpunet_computes(name):
    make, data = CASES[name]
    model = randomised(make()).eval()
    x = data()
    expected = listed(model.forward(x))
    module = gn.export.to_torch(model)
    assert not module.training
    got = run_twin(module, model, x)
    assert len(got) == len(expected)
    for i, (g, want) in enumerate(zip(got, expected)):
        assert g.shape == want.shape and g.dtype == want.dtype
        assert_within(g, want, layer_atol(model, shape_of(x), want), f"{name} output {i}")
    assert set(module.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_gives_identical_state_dict_and_architecture(name):
    model = randomised(CASES[name][0]())
    model.preprocess = {"kind": "image", "scale": 1 / 255, "mean": 0.1, "std": 0.3, "shape": [6]}
    back = gn.export.from_torch(gn.export.to_torch(model))
    assert layer_types(back) == layer_types(model)
    assert list(back.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert back.state_dict()[key].dtype == value.dtype, key
        numpy.testing.assert_array_equal(back.state_dict()[key], value, err_msg=key)
    if isinstance(model, (gn.Sequential, gn.Model)):
        assert back.preprocess == model.preprocess
    x = CASES[name][1]()
    for got, want in zip(listed(back.eval().forward(x)), listed(model.eval().forward(x)), strict=True):
        numpy.testing.assert_array_equal(got, want)


def layer_types(layer) -> list:
    """The layer's type and its descendants', depth first: the architecture up to initialisers."""
    return [type(layer).__name__] + [t for _, child in layer.children() for t in layer_types(child)]


def test_from_plain_torch_modules():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 10)).eval()
    model = gn.export.from_torch(net)
    x = floats(3, 1, 28, 28)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
        assert_within(model.forward(x), want, layer_atol(model, x.shape, want), "Sequential")
    lstm = torch.nn.LSTM(4, 5, batch_first=True)
    layer = gn.export.from_torch(lstm)
    x = floats(2, 6, 4)
    with torch.no_grad():
        want = lstm(torch.from_numpy(x))[0].numpy()
        assert_within(layer.forward(x), want, layer_atol(layer, x.shape, want), "LSTM")
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    layer = gn.export.from_torch(attention)
    x = floats(2, 5, 8)
    with torch.no_grad():
        t = torch.from_numpy(x)
        want = attention(t, t, t)[0].numpy()
        assert_within(layer.forward(x), want, layer_atol(layer, x.shape, want), "MultiheadAttention")


def test_exported_module_trains_in_torch_like_the_gpunet_model():
    """The twin is a real torch module: one SGD step on each side gives the same weights."""
    model = gn.models.mlp((6, 5, 3))
    module = gn.export.to_torch(model)
    x, y = floats(8, 6), ids(3, 8)
    loss, grad = gn.losses.softmax_cross_entropy(model.forward(x), y)
    model.backward(grad)
    gn.optim.SGD(model, lr=0.1).step()
    torch.nn.functional.cross_entropy(module(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    # p - lr g: the gradients within a step's bound (gpunet.parity_bound.step_bound, relative to their
    # largest), then one rounding of the subtraction on each side
    relative = step_bound(model.layers, x.shape, 3)
    for key, value in module.state_dict().items():
        want = value.numpy()
        bound = 0.1 * relative * numpy.abs(model.grads[key]).max() + ulps(want, 2)
        assert_within(model.state_dict()[key], want, bound, key)


def test_unsupported_modules_are_named():
    with pytest.raises(TypeError, match=r"from_torch: module\.1 is a Bilinear, which gpunet.export cannot convert"):
        gn.export.from_torch(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Bilinear(2, 2, 2)))
    with pytest.raises(TypeError, match=r"module\.0 \(Conv2d\) cannot become a gpunet layer: groups"):
        gn.export.from_torch(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, groups=2)))
    with pytest.raises(TypeError, match=r"cannot become a gpunet layer: only one unidirectional"):
        gn.export.from_torch(torch.nn.LSTM(2, 3))  # not batch_first

    @L.register("ExportTestLayer")
    class Custom(L.Identity):
        pass

    with pytest.raises(TypeError, match=r"to_torch: model\[1\] is a Custom, which has no PyTorch twin"):
        gn.export.to_torch(gn.Sequential(L.ReLU(), Custom()))
    del L.LAYER_TYPES["ExportTestLayer"]


@pytest.mark.parametrize("name, x", [("Sequential_lenet", floats(2, 1, 28, 28)), ("Sequential_char_rnn", ids(12, 2, 5)),
                                     ("Sequential_transformer", ids(12, 2, 8))])
def test_onnx_export_through_torch_computes_what_gpunet_computes(tmp_path, name, x):
    """The README's snippet. onnx, onnxscript and onnxruntime are the `onnx` extra, which the test extra
    installs: a user's own environment may lack them, the suite's does not."""
    import onnxruntime as runtime
    model = randomised(CASES[name][0]()).eval()
    torch.onnx.export(gn.export.to_torch(model), (torch.from_numpy(x),), tmp_path / "model.onnx")
    session = runtime.InferenceSession(str(tmp_path / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    want = model.forward(x)
    assert_within(got, want, layer_atol(model, x.shape, want), f"{name} in onnxruntime")
