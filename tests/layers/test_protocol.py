"""The layer protocol of gpunet.layers.base: save_for_backward and the one "backward before
forward" check, backward/backward_params over the backprop hook, children registered on
assignment, repr, and the registry of layer type names."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L
from gpunet.layers import LAYER_TYPES, Composite, Layer, register
from tests.support.arrays import rng

FLOAT = "float32"
CASES = {  # every registered built-in layer: a constructor and an input
    "Dense": (lambda: L.Dense(3, 2), (2, 3)),
    "Conv1D": (lambda: L.Conv1D(2, 3, 2), (2, 2, 5)),
    "Conv2D": (lambda: L.Conv2D(2, 3, 2), (1, 2, 4, 4)),
    "MaxPool2D": (lambda: L.MaxPool2D(2), (1, 2, 4, 4)),
    "AvgPool2D": (lambda: L.AvgPool2D(2), (1, 2, 4, 4)),
    "BatchNorm1d": (lambda: L.BatchNorm1d(3), (4, 3)),
    "BatchNorm2d": (lambda: L.BatchNorm2d(2), (2, 2, 3, 3)),
    "LayerNorm": (lambda: L.LayerNorm(3), (2, 3)),
    "Dropout": (lambda: L.Dropout(0.5), (2, 3)),
    "Flatten": (L.Flatten, (2, 3, 2)),
    "ReLU": (L.ReLU, (2, 3)), "Sigmoid": (L.Sigmoid, (2, 3)), "Tanh": (L.Tanh, (2, 3)), "GELU": (L.GELU, (2, 3)),
    "Softmax": (L.Softmax, (2, 3)), "Identity": (L.Identity, (2, 3)),
    "Embedding": (lambda: L.Embedding(5, 3), "ids"),
    "PositionalEmbedding": (lambda: L.PositionalEmbedding(4, 3), (2, 4, 3)),
    "RNN": (lambda: L.RNN(3, 2), (2, 4, 3)), "LSTM": (lambda: L.LSTM(3, 2), (2, 4, 3)),
    "GRU": (lambda: L.GRU(3, 2), (2, 4, 3)),
    "MultiHeadAttention": (lambda: L.MultiHeadAttention(4, 2), (2, 3, 4)),
    "TransformerBlock": (lambda: L.TransformerBlock(4, 2), (2, 3, 4)),
    "Sequential": (lambda: gn.Sequential(L.Dense(3, 4), L.ReLU(), L.Dense(4, 2)), (2, 3)),
    "Perceptron": (lambda: gn.models.Perceptron(3), (2, 3)),
    "Add": (L.Add, [(2, 3), (2, 3)]), "Multiply": (L.Multiply, [(2, 3), (2, 3), (2, 3)]),
    "Concatenate": (lambda: L.Concatenate(axis=1), [(2, 3), (2, 2)]),
    "Model": (lambda: residual_model(), (2, 3)),
}


def residual_model():
    """A graph model: a residual join of two branches, then a head (fusion on the ReLU branch)."""
    x = gn.Input((3,))
    h = L.ReLU()(L.Dense(3, 4)(x))
    return gn.Model(x, L.Dense(4, 2)(L.Add()([h, L.Dense(3, 4)(x)])))


def make_input(shape, seed=0):
    """A case's input: float32 of shape, a list of them for a list of shapes, or ids."""
    if shape == "ids":
        return rng(seed).integers(0, 5, (2, 4))
    if isinstance(shape, list):
        return [rng(seed + i).standard_normal(s).astype(FLOAT) for i, s in enumerate(shape)]
    return rng(seed).standard_normal(shape).astype(FLOAT)


def shapes_of(value):
    return [a.shape for a in value] if isinstance(value, list) else value.shape


def built_in_types():
    return {name for name, cls in LAYER_TYPES.items() if cls.__module__.startswith("gpunet.")}


def test_every_built_in_layer_type_is_covered_here():
    assert set(CASES) == built_in_types()


def test_private_bases_are_not_registered():
    assert not {name for name in LAYER_TYPES if name.startswith("_")} | ({"Layer", "Composite"} & set(LAYER_TYPES))
    assert all(LAYER_TYPES[name].__name__ == name for name in built_in_types())


@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_before_forward_is_one_clear_error_and_after_forward_works(name):
    make, shape = CASES[name]
    layer = make()
    first = {"Sequential": "Dense", "TransformerBlock": "Dropout", "Model": "gn.Model"}.get(name, name)  # the child
    # that has not run
    with pytest.raises(RuntimeError, match=f"^{first}: backward called before forward$"):
        layer.backward(numpy.zeros(3, FLOAT))
    with pytest.raises(RuntimeError, match=f"^{first}: backward called before forward$"):
        layer.backward_params(numpy.zeros(3, FLOAT))
    x = make_input(shape)
    y = layer.forward(x)
    if name == "Perceptron":  # trained by its own rule
        with pytest.raises(TypeError, match="perceptron rule"):
            layer.backward(y)
        return
    dx = layer.backward(numpy.ones(y.shape, FLOAT))
    assert dx is None if shape == "ids" else shapes_of(dx) == shapes_of(x)
    assert layer.backward(numpy.ones(y.shape, FLOAT), input_grad=False) is None
    layer.to("cpu")  # what the last forward saved belongs to the old device or dtype
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(numpy.ones(y.shape, FLOAT))


def test_a_composite_backpropagates_after_its_children_ran_one_by_one():
    model = gn.Sequential(L.Dense(3, 4), L.Tanh(), L.Dense(4, 2))
    x = rng().standard_normal((2, 3)).astype(FLOAT)
    for layer in model.layers:  # as gpunet parity does, to record every activation
        x = layer.forward(x)
    assert model.backward(numpy.ones_like(x)).shape == (2, 3)


def test_backward_params_writes_the_same_gradients_as_backward():
    model = gn.models.transformer(vocab_size=5, context=4, d_model=4, num_heads=2, num_layers=1)
    ids = rng().integers(0, 5, (2, 4))
    dy = rng(1).standard_normal(model.forward(ids).shape).astype(FLOAT)
    model.backward(dy)
    full = {k: numpy.array(v) for k, v in model.grads.items()}
    assert model.backward_params(dy) is None
    for name, grad in full.items():
        # the same parameter-gradient ops as backward (only dx is skipped), in the same order: the
        # same bits on the CPU, so no sum's bound is needed; 1e-6 (16 u) is no more than a rounding
        numpy.testing.assert_allclose(model.grads[name], grad, rtol=1e-6, err_msg=name)


def test_repr_is_describe():
    assert repr(L.Dense(3, 2)) == "Dense(3, 2, bias=True)" == L.Dense(3, 2).describe()
    assert repr(L.LSTM(3, 2)) == "LSTM(3, 2, bias=True)"
    assert repr(L.TransformerBlock(4, 2)).startswith("TransformerBlock(d_model=4")
    assert repr(gn.Sequential(L.ReLU())) == "Sequential(\n  (0): ReLU()\n)"


# ------------------------------------------------------------------ children

class Residual(Composite):
    """y = x + inner(x): a composite whose children register on assignment."""

    def __init__(self, d):
        super().__init__(d=d)
        self.inner = gn.Sequential(L.Dense(d, d), L.Tanh())
        self.norm = L.LayerNorm(d)
        self._shared = self.inner  # a _name holds a layer without owning it

    def forward(self, x):
        return self.norm.forward(x + self.inner.forward(x))  # the children save what they need

    def backprop(self, dy, saved, need_dx):
        g = self.norm.backward(dy)
        return g + self.inner.backward(g)


def test_children_register_in_assignment_order_and_name_the_parameters():
    block = Residual(3)
    assert [name for name, _ in block.children()] == ["inner", "norm"]
    assert list(block.params) == ["inner.0.weight", "inner.0.bias", "norm.weight", "norm.bias"]
    assert list(block.grads) == list(block.params)
    block.norm = L.LayerNorm(3, elementwise_affine=False)  # a replaced child keeps its place
    assert [name for name, _ in block.children()] == ["inner", "norm"]
    assert list(block.params) == ["inner.0.weight", "inner.0.bias"]
    with pytest.raises(TypeError, match="child layer 'norm' can only be replaced by a layer"):
        block.norm = None


def test_a_composite_trains_and_moves_its_children():
    from tests.support.gradcheck import check_layer
    block = Residual(3)
    check_layer(block, rng().standard_normal((4, 3)))  # float64 finite differences, after .to(dtype=)
    assert block.inner[0].params["weight"].dtype == numpy.float64
    block.eval()
    assert not block.norm.training and not block.inner[1].training


def test_a_leaf_layer_cannot_own_a_child_by_accident():
    class Leaf(Layer):
        def __init__(self):
            super().__init__()
            self.helper = L.Dense(2, 2)

    with pytest.raises(TypeError, match="only a Composite has child layers; derive from Composite to hold 'helper'"):
        Leaf()


# ------------------------------------------------------------------ registry

@pytest.fixture
def registry():
    before = dict(LAYER_TYPES)
    yield LAYER_TYPES
    LAYER_TYPES.clear()
    LAYER_TYPES.update(before)


def test_a_user_class_cannot_silently_replace_a_built_in(registry):
    with pytest.raises(ValueError, match="'Dense' is already registered to gpunet.layers.dense.Dense"):
        @register("Dense")
        class Dense(Layer):  # noqa: F811 - the point of the test
            pass
    assert registry["Dense"] is L.Dense

    @register("Dense", replace=True)
    class MyDense(L.Dense):
        pass
    assert registry["Dense"] is MyDense


def test_an_unregistered_layer_cannot_be_saved_and_a_registered_one_round_trips(registry, tmp_path):
    class Scale(Layer):
        def __init__(self, factor: float = 2.0):
            super().__init__(factor=factor)

        def forward(self, x):
            self.save_for_backward()
            return x * self.config["factor"]

        def backprop(self, dy, saved, need_dx):
            return dy * self.config["factor"]

    model = gn.Sequential(L.Dense(3, 2), Scale(3.0))
    with pytest.raises(TypeError, match=r"Scale is not a registered layer type.*register\('Scale'\)"):
        gn.save(model, tmp_path / "m.safetensors")
    register("Scale")(Scale)
    gn.save(model, tmp_path / "m.safetensors")
    x = rng().standard_normal((2, 3)).astype(FLOAT)
    numpy.testing.assert_array_equal(gn.load(tmp_path / "m.safetensors").forward(x), model.forward(x))
    del registry["Scale"]
    with pytest.raises(ValueError, match="unknown layer type 'Scale'.*registered with gpunet.layers.register"):
        gn.load(tmp_path / "m.safetensors")


def test_redefining_the_same_class_replaces_it(registry):
    def define():
        @register("Twice")
        class Twice(L.Identity):
            pass
        return Twice

    first, second = define(), define()  # as a notebook cell run twice, or a module reload
    assert first is not second and registry["Twice"] is second
