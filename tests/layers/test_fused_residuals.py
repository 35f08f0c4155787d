"""The transformer's fused ops against the CPU's: layer norm with its residual adds (forward and
backward) and its parameter gradients written in place, and the fused attention; odd widths,
rows that are not a multiple of a block or of a row chunk, and head sizes over a warp."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L
from gpunet.layers.flat import flat_parameters
from tests.support.arrays import on, rng
from tests.support.tolerance import assert_within, gamma, layer_atol, sum_atol, ulps


def close(got, want, layer, input_shape, what="result"):
    """got within the bound of the sums one step of `layer` runs on input_shape (tolerance.layer_atol)."""
    want = gn.to_numpy(want)
    assert_within(gn.to_numpy(got), want, layer_atol(layer, input_shape, want), what)


def sums_of_rows_atol(model, ids, dy, seed=3):
    """An embedding's gradients are sums of dy rows (per id, per position): 2 gamma_n times the
    same sums of |dy| (the model's own backward of |dy|), n the rows summed at most."""
    gn.manual_seed(seed)
    model.forward(ids)
    model.backward_params(numpy.abs(dy))
    return [2 * gamma(ids.size) * g.astype("float64") for g in model.grads.values()]


def nudged(layer, seed=3):
    for value in layer.params.values():
        value[...] = value + rng(seed).uniform(-0.5, 0.5, value.shape).astype("float32")
    return layer


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 47, 37), (133, 600)], ids=["3x47x37", "133x600"])
def test_layer_norm_add_and_backward_add_match_the_cpu(shape):
    width = shape[-1]
    x, res, dy, dres = (rng(i).standard_normal(shape).astype("float32") * 2 for i in range(4))
    results = {}
    for device in ("cpu", "gpu"):
        layer = nudged(L.LayerNorm(width)).to(device)
        grads = {k: id(v) for k, v in layer.grads.items()}
        total, y = layer.forward_add(on(device, x), on(device, res))
        dx = layer.backward_add(on(device, dy), on(device, dres))
        assert {k: id(v) for k, v in layer.grads.items()} == grads  # written in place
        results[device] = [total, y, dx, layer.grads["weight"], layer.grads["bias"]]
    for got, want, what in zip(results["gpu"], results["cpu"], ("total", "y", "dx", "dw", "db")):
        close(got, want, layer, shape, what)
    # and the CPU's against the unfused layers
    plain = nudged(L.LayerNorm(width))
    close(results["cpu"][1], plain.forward(x + res), plain, shape, "y")
    close(results["cpu"][2], plain.backward(dy) + dres, plain, shape, "dx")
    close(results["cpu"][3], plain.grads["weight"], plain, shape, "dw")


@pytest.mark.gpu
def test_layer_norm_writes_its_gradients_into_the_flat_buffer():
    model = gn.Sequential(L.Dense(5, 37), nudged(L.LayerNorm(37))).to("gpu")
    buffer = flat_parameters(model).groups[0].grad
    x = rng(1).standard_normal((70, 5)).astype("float32")
    dy = rng(2).standard_normal((70, 37)).astype("float32")
    model.forward(on("gpu", x))
    model.backward(on("gpu", dy))
    cpu = gn.Sequential(L.Dense(5, 37), nudged(L.LayerNorm(37)))
    cpu.load_state_dict({k: gn.to_numpy(v) for k, v in model.params.items()})
    cpu.forward(x)
    cpu.backward(dy)
    close(model.grads["1.weight"], cpu.grads["1.weight"], cpu, x.shape, "1.weight")
    close(model.grads["1.bias"], cpu.grads["1.bias"], cpu, x.shape, "1.bias")
    size = gn.to_numpy(buffer).size  # two float32 sums of the same positive values: within 2 gamma_n
    assert numpy.abs(gn.to_numpy(buffer)).sum() == pytest.approx(
        sum(numpy.abs(gn.to_numpy(g)).sum() for g in model.grads.values()), rel=2 * gamma(size))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d, heads, t", [(21, 3, 37), (80, 2, 9)], ids=["head-7", "head-40"])
def test_fused_attention_matches_the_cpu(d, heads, t, causal):
    x = rng(1).standard_normal((3, t, d)).astype("float32")
    dy = rng(2).standard_normal((3, t, d)).astype("float32")
    results = {}
    for device in ("cpu", "gpu"):
        gn.manual_seed(5)  # the same initial weights
        layer = nudged(L.MultiHeadAttention(d, heads, causal=causal), seed=5).to(device)
        y = layer.forward(on(device, x))
        results[device] = [y, layer.backward(on(device, dy)), *layer.grads.values()]
    for got, want in zip(results["gpu"], results["cpu"]):
        close(got, want, layer, x.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout, training", [(0.0, True), (0.3, True), (0.3, False)])
def test_transformer_block_matches_the_cpu_on_either_residual_path(dropout, training):
    """Dropout active: the residual add runs in the dropout kernel; else in the layer norm's."""
    x = rng(1).standard_normal((2, 11, 24)).astype("float32")
    dy = rng(2).standard_normal((2, 11, 24)).astype("float32")
    results = {}
    for device in ("cpu", "gpu"):
        gn.manual_seed(7)
        block = nudged(L.TransformerBlock(24, 3, mlp_ratio=2, dropout=dropout)).to(device).train(training)
        y = block.forward(on(device, x))
        results[device] = [y, block.backward(on(device, dy)), *block.grads.values()]
    for got, want in zip(results["gpu"], results["cpu"]):
        close(got, want, block, x.shape)


def test_positional_embedding_zeroes_the_gradient_of_unused_positions():
    layer = L.PositionalEmbedding(7, 3)
    layer.grads["weight"][...] = 5.0
    dy = rng(1).standard_normal((2, 4, 3)).astype("float32")
    layer.forward(numpy.zeros((2, 4, 3), "float32"))
    layer.backward(dy)
    assert_within(layer.grads["weight"][:4], dy.sum(axis=0), sum_atol(dy, 0), "weight gradient")
    assert not layer.grads["weight"][4:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("t", [6, 4], ids=["all-positions", "fewer-positions"])
def test_embedding_absorbing_positions_matches_the_cpu_and_the_layers_alone(t):
    ids = rng(1).integers(0, 11, (3, t))
    ids[0, :2] = 4  # a repeated id
    dy = rng(2).standard_normal((3, t, 37)).astype("float32")
    results = {}
    for device in ("cpu", "gpu"):
        gn.manual_seed(3)
        model = gn.Sequential(L.Embedding(11, 37), L.PositionalEmbedding(6, 37)).to(device)
        for g in model.grads.values():
            g[...] = 9.0  # every entry must be written
        y = model.forward(on(device, ids))
        model.backward_params(on(device, dy))
        results[device] = [y, *model.grads.values()]
    bounds = [ulps(results["cpu"][0], 1),  # y: a row plus a position, one rounding
              *sums_of_rows_atol(gn.Sequential(L.Embedding(11, 37), L.PositionalEmbedding(6, 37)), ids, dy)]
    for got, want, bound, what in zip(results["gpu"], results["cpu"], bounds, ("y", "embedding", "positions")):
        assert_within(gn.to_numpy(got), gn.to_numpy(want), bound, what)
    gn.manual_seed(3)
    emb, pos = L.Embedding(11, 37), L.PositionalEmbedding(6, 37)  # each alone
    assert_within(results["cpu"][0], pos.forward(emb.forward(ids)), bounds[0], "y alone")
    emb.backward_params(pos.backward(dy))
    assert_within(results["cpu"][1], emb.grads["weight"], bounds[1], "embedding alone")
    assert_within(results["cpu"][2], pos.grads["weight"], bounds[2], "positions alone")


def test_an_absorbed_positional_embedding_still_refuses_too_many_positions():
    model = gn.Sequential(L.Embedding(11, 8), L.PositionalEmbedding(6, 8))
    with pytest.raises(ValueError, match=r"PositionalEmbedding\(.*input of shape \(2, 7, 8\) needs at most 6 positions"):
        model.forward(numpy.zeros((2, 7), "int64"))


@pytest.mark.gpu
@pytest.mark.parametrize("dropout, training", [(0.0, True), (0.3, True), (0.3, False)])
def test_blocks_absorbing_the_next_ones_match_the_cpu_and_the_layers_alone(dropout, training):
    """Sequential(block, block, LayerNorm, Dense): each block's closing residual add runs inside
    the next layer norm (unless the dropout adds it); the same as running each layer alone."""
    x = rng(1).standard_normal((2, 7, 24)).astype("float32")
    dy = rng(2).standard_normal((2, 7, 5)).astype("float32")

    def make():
        gn.manual_seed(4)
        return gn.Sequential(*(nudged(L.TransformerBlock(24, 3, mlp_ratio=2, dropout=dropout), seed=i)
                               for i in range(2)), nudged(L.LayerNorm(24)), L.Dense(24, 5)).train(training)

    results = {}
    for device in ("cpu", "gpu"):
        model = make().to(device)
        gn.manual_seed(9)
        y = model.forward(on(device, x))
        absorbed = [getattr(layer._saved, "absorbed", False) for layer in model.layers]
        results[device] = [y, model.backward(on(device, dy)), *model.grads.values()]
    assert absorbed == [False, True, True, False] if dropout == 0.0 or not training else [False] * 4
    reference = make()
    for got, want in zip(results["gpu"], results["cpu"]):
        close(got, want, reference, x.shape)
    alone = make()
    gn.manual_seed(9)
    h = x
    for layer in alone.layers:
        h = layer.forward(h)
    g = dy
    for layer in reversed(alone.layers):
        g = layer.backward(g)
    for got, want in zip(results["cpu"], [h, g, *alone.grads.values()]):
        close(got, want, alone, x.shape)


@pytest.mark.gpu
def test_embedding_gradients_past_the_scan_limit_take_the_scatter_add(monkeypatch):
    from gpunet.backend import cupy_ops

    monkeypatch.setattr(cupy_ops, "EMBEDDING_SCAN_LIMIT", 0)
    ids, dy = rng(1).integers(0, 11, (3, 4)), rng(2).standard_normal((3, 4, 6)).astype("float32")
    results = {}
    for device in ("cpu", "gpu"):
        gn.manual_seed(3)
        model = gn.Sequential(L.Embedding(11, 6), L.PositionalEmbedding(5, 6)).to(device)
        model.forward(on(device, ids))
        model.backward_params(on(device, dy))
        results[device] = list(model.grads.values())
    bounds = sums_of_rows_atol(gn.Sequential(L.Embedding(11, 6), L.PositionalEmbedding(5, 6)), ids, dy)
    for got, want, bound, what in zip(results["gpu"], results["cpu"], bounds, ("embedding", "positions")):
        assert_within(gn.to_numpy(got), gn.to_numpy(want), bound, what)
