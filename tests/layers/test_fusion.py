"""Sequential runs a Dense or Conv2D with the activation after it (and a Conv2D -> ReLU ->
MaxPool2D) in one pass: the outputs and every gradient equal those of the layers run one by one,
in float64 on the CPU as the reference, on every device."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.layers import (GELU, GRU, LSTM, RNN, Conv2D, Dense, Embedding, Flatten, MaxPool2D, ReLU, Sequential, Sigmoid,
                           Tanh)
from gpunet.layers.recurrent import EmbeddedIds
from tests.support.arrays import DEVICES, on, rng
from tests.support.tolerance import assert_within, layer_atol


def lenet_like():
    gn.manual_seed(3)
    return Sequential(Conv2D(2, 3, 3), ReLU(), MaxPool2D(2), Conv2D(3, 4, 2), Tanh(), MaxPool2D(2, stride=1),
                      Flatten(), Dense(4 * 2 * 2, 7), Sigmoid(), Dense(7, 6), GELU(), Dense(6, 5), ReLU())


def one_by_one(model, x, dy):
    """Forward and backward through each layer alone: no fusion."""
    for layer in model.layers:
        x = layer.forward(x)
    out = x
    for layer in reversed(model.layers):
        dy = layer.backward(dy)
    return out, dy, {k: gn.to_numpy(g).copy() for k, g in model.grads.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_fused_layers_equal_the_layers_run_one_by_one(device):
    x = rng(1).standard_normal((3, 2, 11, 11))
    dy = rng(2).standard_normal((3, 5))
    reference = lenet_like().to("cpu", dtype="float64")
    want_out, want_dx, want_grads = one_by_one(reference, x, dy)

    dtype = "float64" if device == "cpu" else "float32"
    model = lenet_like().to(device, dtype=dtype)
    out = model.forward(on(device, x.astype(dtype)))
    dx = model.backward(on(device, dy.astype(dtype)))
    close = closeness(dtype, reference, x.shape)
    close(out, want_out, "output")
    close(dx, want_dx, "input gradient")
    for name, want in want_grads.items():
        close(model.grads[name], want, name)


def closeness(dtype, reference, input_shape):
    """float64 against the float64 layers one by one: 1e-12, thousands of float64 roundings (u = 1.1e-16);
    float32 against them: the bound of the sums one step of the model runs (tolerance.layer_atol)."""
    def close(got, want, what):
        if dtype == "float64":
            numpy.testing.assert_allclose(gn.to_numpy(got), want, rtol=1e-12, atol=1e-12, err_msg=what)
        else:
            assert_within(gn.to_numpy(got), want, layer_atol(reference, input_shape, want), what)
    return close


def char_model(cell, vocab):
    gn.manual_seed(5)
    return Sequential(Embedding(vocab, 6), {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}[cell](6, 5), Dense(5, vocab))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("vocab", [7, 40], ids=["table-rows-projected", "tokens-projected"])
def test_an_embedding_absorbing_a_recurrent_layer_equals_the_layers_run_one_by_one(device, cell, vocab):
    """Fewer table rows (7) than tokens (24): the recurrent layer projects each row once and sums
    the gates' gradient per id. More (40): the embedded tokens as usual, inside the Embedding."""
    ids = rng(1).integers(0, vocab, (3, 8))
    ids[0, :3] = 2  # a repeated id
    dy = rng(2).standard_normal((3, 8, vocab))
    reference = char_model(cell, vocab).to("cpu", dtype="float64")
    want_out, _, want_grads = one_by_one(reference, ids, dy)

    dtype = "float64" if device == "cpu" else "float32"
    model = char_model(cell, vocab).to(device, dtype=dtype)
    for g in model.grads.values():
        g[...] = 9.0  # every entry must be written
    out = model.forward(on(device, ids))
    assert isinstance(model.layers[0].saved.recurrent[1].xs, EmbeddedIds) == (vocab < ids.size)
    assert model.backward(on(device, dy.astype(dtype))) is None  # ids have no gradient
    close = closeness(dtype, reference, ids.shape)
    close(out, want_out, "output")
    for name, want in want_grads.items():
        close(model.grads[name], want, name)


def test_an_absorbed_recurrent_layer_refuses_an_embedding_of_the_wrong_size_as_it_does_alone():
    model = Sequential(Embedding(4, 6), LSTM(5, 3))
    ids = numpy.zeros((2, 5), "int64")
    with pytest.raises(ValueError) as alone:
        model.layers[1].forward(model.layers[0].forward(ids))
    with pytest.raises(ValueError) as fused:
        model.forward(ids)
    assert str(fused.value) == str(alone.value) and "LSTM(5, 3" in str(fused.value)


def test_which_layers_are_absorbed():
    model = lenet_like()
    model.forward(rng(1).standard_normal((2, 2, 11, 11)).astype("float32"))
    absorbed = [i for i, layer in enumerate(model.layers) if getattr(layer._saved, "absorbed", False)]
    # conv+relu+pool (overlapping-free windows), conv+tanh (its pool overlaps: stride 1), dense+sigmoid,
    # dense+gelu, dense+relu
    assert absorbed == [1, 2, 4, 8, 10, 12]


def test_an_absorbed_layer_called_alone_says_so():
    model = Sequential(Dense(3, 2), ReLU())
    model.forward(numpy.ones((1, 3), "float32"))
    with pytest.raises(RuntimeError, match=r"^ReLU: its last forward ran inside the layer before it \(fused by "
                                           r"Sequential\); call the Sequential's backward$"):
        model.layers[1].backward(numpy.ones((1, 2), "float32"))


def test_a_layer_run_alone_between_the_fused_forward_and_the_backward_is_refused():
    """Dense's own forward replaces the fused one it saved: a backward would then skip the ReLU's
    gradient (the ReLU is still marked absorbed) and return a wrong gradient without a word."""
    model = Sequential(Dense(3, 2), ReLU(), Dense(2, 2))
    x = rng(2).standard_normal((4, 3)).astype("float32")
    model.forward(x)
    for alone in (0, 1):  # the absorbing Dense, or the absorbed ReLU (whose gradient would then count twice)
        model.forward(x)
        model.layers[alone].forward(numpy.ones((4, 2), "float32") if alone else x)
        with pytest.raises(RuntimeError, match=rf"^{type(model.layers[alone]).__name__} \(layer {alone} of the "
                                               r"Sequential\) ran forward on its own after the Sequential's forward ran "
                                               r"layers 0 to 1 as one; run the Sequential's forward again before its "
                                               r"backward$"):
            model.backward(numpy.ones((4, 2), "float32"))
    model.forward(x)
    fused = model.backward(numpy.ones((4, 2), "float32"))
    h = x
    for layer in model.layers:  # all alone, as gpunet parity runs them: consistent, and the same gradient
        h = layer.forward(h)
    assert_within(model.backward(numpy.ones((4, 2), "float32")), fused, layer_atol(model, x.shape, fused), "dx")
