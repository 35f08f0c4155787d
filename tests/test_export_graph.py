"""gn.export on graph models (gn.Model): the torch module computes the same outputs, has the same
state_dict names, calls a shared layer's one submodule once per node, nests Sequentials and Models as
gpunet does, trains like the gpunet model (every gradient), converts back to an equal gn.Model, and
goes through ONNX with two inputs and two outputs. Tolerances: tests/support/tolerance.layer_atol (the
sums along the model's forward and backward, gpunet.parity_bound.reduction_path)."""
from __future__ import annotations

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from tests.support.arrays import DEVICES, on
from gpunet.parity_bound import reduction_path
from tests.support.tolerance import assert_within, layer_atol, path_atol
from tests.test_export import CASES as LAYER_CASES
from tests.test_export import floats, randomised
from tests.layers.test_graph import siamese  # noqa: F401  (one definition of the shared-encoder model)


def small_resnet():
    """A residual block with batch norm and a projection shortcut on images, then a head: Conv2D,
    BatchNorm2d, ReLU, Add, MaxPool2D, Flatten, Dense."""
    x = gn.Input((1, 6, 6))
    h = L.ReLU()(L.BatchNorm2d(3)(L.Conv2D(1, 3, 3, padding=1, name="conv1")(x)))
    h = L.BatchNorm2d(3)(L.Conv2D(3, 3, 3, padding=1, name="conv2")(h))
    h = L.ReLU()(L.Add()([h, L.Conv2D(1, 3, 1, name="shortcut")(x)]))
    return gn.Model(x, L.Dense(27, 4, name="fc")(L.Flatten()(L.MaxPool2D(2)(h))))


def nested_two_inputs():
    """A gn.Model with two inputs and two outputs used as a layer of another (its twin takes two arguments)."""
    p, q = gn.Input((3,)), gn.Input((3,))
    inner = gn.Model([p, q], [L.Add()([p, q]), L.Dense(3, 2, name="d")(q)], name="inner")
    a, b = gn.Input((3,)), gn.Input((3,))
    total, projected = inner([a, b])
    return gn.Model([a, b], L.Concatenate()([L.Dense(3, 2, name="o")(total), projected]))


CASES = {
    "nested_two_inputs": (nested_two_inputs, lambda: [floats(2, 3), floats(2, 3)]),
    "siamese": (siamese, lambda: [floats(4, 6), floats(4, 6)]),
    "siamese_nested_model": (lambda: siamese(nested=True), lambda: [floats(4, 6), floats(4, 6)]),
    "small_resnet": (small_resnet, lambda: floats(3, 1, 6, 6)),
}


def tensors(x):
    return [torch.from_numpy(a) for a in x] if isinstance(x, list) else [torch.from_numpy(x)]


def shape_of(x):
    return tuple(a.shape for a in x) if isinstance(x, list) else x.shape


def listed(y) -> list:
    return list(y) if isinstance(y, (list, tuple)) else [y]


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_state_dict_names_are_the_models(name):
    make, data = CASES[name]
    model, x = randomised(make()).eval(), data()
    module = gn.export.to_torch(model)
    assert set(module.state_dict()) == set(model.state_dict())  # (gpunet lists parameters, then buffers)
    assert [k for k, _ in module.named_parameters()] == list(model.params)  # in the same order
    with torch.no_grad():
        got = listed(module(*tensors(x)))
    want = listed(model.forward(x))
    assert isinstance(module(*tensors(x)), tuple) == (len(want) > 1)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_within(g.numpy(), w, layer_atol(model, shape_of(x), w), f"{name} output {i}")


def test_state_dict_names_nest_as_gpunet_names_them():
    assert list(gn.export.to_torch(siamese()).state_dict())[:4] == ["enc.0.weight", "enc.0.bias", "enc.2.weight",
                                                                    "enc.2.bias"]
    nested = gn.export.to_torch(siamese(nested=True))
    assert list(nested.state_dict())[:4] == ["enc.dense.weight", "enc.dense.bias", "enc.dense_1.weight",
                                             "enc.dense_1.bias"]
    assert isinstance(nested.enc, torch.nn.Module) and isinstance(nested.enc.dense, torch.nn.Linear)
    assert list(gn.export.to_torch(small_resnet()).state_dict())[:7] == [
        "conv1.weight", "conv1.bias", "batchnorm2d.weight", "batchnorm2d.bias", "batchnorm2d.running_mean",
        "batchnorm2d.running_var", "batchnorm2d.num_batches_tracked"]  # default names, as gpunet gives them


@pytest.mark.parametrize("nested", [False, True])
def test_a_shared_layer_is_one_submodule_called_once_per_node(nested):
    module = gn.export.to_torch(siamese(nested))
    calls = []
    module.enc.register_forward_hook(lambda *args: calls.append("enc"))
    module(*tensors([floats(2, 6), floats(2, 6)]))
    assert calls == ["enc", "enc"]
    assert sum(1 for name, _ in module.named_children() if name == "enc") == 1


def bias_term_sizes(module) -> dict:
    """Per bias of a Linear or Conv2d, the largest sum of |terms| its gradient sums (|dy| over every axis
    but the channel's, over every call), filled in by module's backward. The bound of a sum is relative to
    that (gpunet.parity_bound), not to the result: a bias before a batch norm in training mode has a
    gradient of exactly 0 in exact arithmetic, rounding noise in float32."""
    sums: dict = {}

    def hook(name, channel_axis):
        def record(layer, grad_input, grad_output):
            g = grad_output[0].detach().abs().double()
            axes = [a for a in range(g.ndim) if a != channel_axis % g.ndim]
            sums[name] = sums.get(name, 0) + g.sum(dim=axes).numpy()
        return record

    for name, layer in module.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and layer.bias is not None:
            layer.register_full_backward_hook(hook(name, 1 if isinstance(layer, torch.nn.Conv2d) else -1))
    return sums


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_exported_module_has_the_models_gradients(name):
    """The torch module trains like the gpunet model: from the same upstream gradients, every parameter
    gradient and every input gradient within the bound of the model's forward and backward sums (a
    shared layer's gradient, summed over its calls, included)."""
    make, data = CASES[name]
    model, x = randomised(make()).train(), data()
    module = gn.export.to_torch(model)
    terms = bias_term_sizes(module)
    inputs = [t.requires_grad_() for t in tensors(x)]
    ys = listed(module(*inputs))
    dys = [floats(*y.shape) for y in ys]
    torch.autograd.backward(ys, [torch.from_numpy(d) for d in dys])
    for y, want in zip(listed(model.forward(x)), ys, strict=True):  # batch statistics in training mode, both sides
        assert_within(y, want.detach().numpy(), layer_atol(model, shape_of(x), want.detach().numpy()), f"{name} y")
    dxs = listed(model.backward(dys if len(dys) > 1 else dys[0]))
    grads = dict(module.named_parameters())
    assert set(grads) == set(model.grads)
    length = reduction_path(model, shape_of(x))[0]
    for key, value in grads.items():
        want = value.grad.numpy()
        size = terms[key.removesuffix(".bias")] if key.endswith(".bias") and key.removesuffix(".bias") in terms else want
        assert_within(model.grads[key], want, path_atol(size, length), f"{name} {key}")
    for i, (dx, t) in enumerate(zip(dxs, inputs, strict=True)):
        want = t.grad.numpy()
        assert_within(dx, want, layer_atol(model, shape_of(x), want), f"{name} input {i}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_torch_gives_back_an_equal_model(name):
    make, data = CASES[name]
    model = randomised(make())
    model.preprocess = [None, None] if name != "small_resnet" else \
        {"kind": "image", "scale": 1 / 255, "mean": 0.1, "std": 0.3, "shape": [1, 6, 6]}
    module = gn.export.to_torch(model)
    back = gn.export.from_torch(module)
    assert type(back) is gn.Model and pools_strided(back.to_config()) == pools_strided(model.to_config())
    assert back.preprocess == model.preprocess
    assert list(back.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        numpy.testing.assert_array_equal(back.state_dict()[key], value, err_msg=key)
    x = data()
    for got, want in zip(listed(back.eval().forward(x)), listed(model.eval().forward(x)), strict=True):
        numpy.testing.assert_array_equal(got, want)


# every one-input case of tests/test_export.py (the merge layers and graphs take several; the perceptron has
# no gradient), as a layer shared by two inputs
SHARED = [name for name in sorted(LAYER_CASES) if name not in ("Add", "Multiply", "Concatenate", "Concatenate_last",
                                                                "Model_residual", "Model_two_inputs", "Perceptron")]


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_layer_of_every_type_has_the_twins_gradients(name):
    """Model([a, b], Add()([layer(a), layer(b)])) in eval mode (no dropout draws, running statistics), against
    torch's autograd through the exported module: the shared layer's gradient is the sum over its two calls."""
    make, data = LAYER_CASES[name]
    layer, xs = randomised(make()), [data(), data()]
    a, b = (gn.Input(x.shape[1:], str(x.dtype)) for x in xs)
    model = gn.Model([a, b], L.Add()([layer(a), layer(b)])).eval()
    module = gn.export.to_torch(model)
    inputs = [t.requires_grad_() if t.dtype.is_floating_point else t for t in tensors(xs)]
    y = module(*inputs)
    dy = floats(*y.shape)
    y.backward(torch.from_numpy(dy))
    shapes = shape_of(xs)
    want = y.detach().numpy()
    assert_within(model.forward(xs), want, layer_atol(model, shapes, want), f"{name} output")
    floating = xs[0].dtype.kind == "f"
    dxs = model.backward(dy, input_grad=floating)
    for key, value in module.named_parameters():
        want = value.grad.numpy()
        assert_within(model.grads[key], want, layer_atol(model, shapes, want), f"{name} {key}")
    for i, (dx, t) in enumerate(zip(dxs if floating else [], inputs)):
        want = t.grad.numpy()
        assert_within(dx, want, layer_atol(model, shapes, want), f"{name} input {i}")


def pools_strided(config):
    """A to_config() description (layers, names, wiring) with a pool's default stride (None) written as
    what it is, the kernel size: torch keeps it that way, so it comes back from torch so."""
    if isinstance(config, list):
        return [pools_strided(item) for item in config]
    if not isinstance(config, dict):
        return config
    config = {key: pools_strided(value) for key, value in config.items()}
    if config.get("type") in ("MaxPool2D", "AvgPool2D") and config["args"]["stride"] is None:
        config["args"] = {**config["args"], "stride": config["args"]["kernel_size"]}
    return config


def test_weights_trained_in_torch_come_back():
    """A graph fine-tuned in torch converts back with torch's weights (what a user exports for)."""
    model = siamese()
    module = gn.export.to_torch(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    out, sim = module(*tensors([floats(8, 6), floats(8, 6)]))
    (out.square().mean() + sim.mean()).backward()
    optimizer.step()
    back = gn.export.from_torch(module)
    for key, value in module.state_dict().items():
        numpy.testing.assert_array_equal(back.state_dict()[key], value.numpy(), err_msg=key)
    assert any(not numpy.array_equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_on_either_device_exports_the_same_module(device):
    model = randomised(siamese()).eval()
    x = [floats(3, 6), floats(3, 6)]
    want = [m.detach().numpy() for m in gn.export.to_torch(model)(*tensors(x))]
    model.to(device)
    got = gn.export.to_torch(model)(*tensors(x))
    for g, w in zip(got, want, strict=True):
        numpy.testing.assert_array_equal(g.detach().numpy(), w)  # the same weights: the same torch arithmetic
    ys = model.forward([on(device, a) for a in x])
    for y, w in zip(ys, want, strict=True):
        y = gn.to_numpy(y)
        assert_within(y, w, layer_atol(model, shape_of(x), w), f"{device} output")


def test_refusals_name_the_layer():
    x = gn.Input((3,))
    with pytest.raises(TypeError, match=r"^to_torch: model: layer 'train' has the name of an attribute of "
                                         r"torch.nn.Module .*rename the layer \(name=...\)$"):
        gn.export.to_torch(gn.Model(x, L.Dense(3, 2, name="train")(x)))

    @L.register("ExportGraphTestLayer")
    class Custom(L.Identity):
        pass

    try:
        with pytest.raises(TypeError, match=r"^to_torch: model\['custom'\] is a Custom, which has no PyTorch twin"):
            gn.export.to_torch(gn.Model(x, Custom()(L.Dense(3, 3)(x))))
    finally:
        del L.LAYER_TYPES["ExportGraphTestLayer"]
    module = gn.export.to_torch(siamese())
    with pytest.raises(TypeError, match=r"takes 2 input tensor\(s\), one per gn.Input, got 1"):
        module(torch.zeros(2, 6))
    module.add_module("extra", torch.nn.Bilinear(2, 2, 2))
    with pytest.raises(TypeError, match=r"^from_torch: module\.extra is a Bilinear"):
        gn.export.from_torch(module)


@pytest.mark.parametrize("name", ["siamese", "small_resnet"])
def test_onnx_export_through_torch_computes_what_gpunet_computes(tmp_path, name):
    """Two inputs and two outputs (a shared encoder, Concatenate, Multiply, Add), and a residual block with
    batch norm, in onnxruntime."""
    import onnxruntime as runtime
    make, data = CASES[name]
    model, x = randomised(make()).eval(), data()
    torch.onnx.export(gn.export.to_torch(model), tuple(tensors(x)), tmp_path / "model.onnx")
    session = runtime.InferenceSession(str(tmp_path / "model.onnx"))
    feeds = {spec.name: a for spec, a in zip(session.get_inputs(), x if isinstance(x, list) else [x], strict=True)}
    got = session.run(None, feeds)
    for i, (g, w) in enumerate(zip(got, listed(model.forward(x)), strict=True)):
        assert_within(g, w, layer_atol(model, shape_of(x), w), f"{name} output {i} in onnxruntime")
