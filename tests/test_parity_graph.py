"""`gpunet parity` per node of a graph model (gn.Model): a report row per node named by its layer's name
in the model (a shared layer's later calls "enc#2"), each node's layer run alone, the CPU against the
stand-in GPU in lockstep held to gpunet.parity_bound's bound, which a planted bug leaves. The command
line takes recipes; parity.compare takes a model and its batches."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L
from gpunet import parity
from gpunet.cli import main
from gpunet.recipes import RECIPES, Recipe
from tests.support.arrays import rng
from tests.test_parity import _planted, _swap_first_rows, _wrong_weight_gradient, assert_within_bound
from tests.test_parity import our_gemm_on_the_standin  # noqa: F401 (a fixture)

STEPS, BATCH = 3, 4


def two_heads(dropout=None):
    """Two inputs through one shared encoder (a Sequential), joined by Concatenate, Multiply and Add; a
    batch norm on one branch; two classifier heads; dropout on one branch when asked."""
    a, b = gn.Input((6,)), gn.Input((6,))
    encoder = gn.Sequential(L.Dense(6, 8), L.ReLU(), L.Dense(8, 4), name="enc")
    ea, eb = encoder(a), encoder(b)
    joined = L.Concatenate(axis=1)([ea, eb, L.Multiply()([ea, eb])])
    if dropout is not None:
        joined = L.Dropout(dropout, name="drop")(joined)
    mixed = L.Tanh()(L.BatchNorm1d(4, name="norm")(L.Add()([ea, eb])))
    return gn.Model([a, b], [L.Dense(12, 3, name="out")(joined), L.Dense(4, 2, name="head")(mixed)])


def batches(steps=STEPS, batch=BATCH, seed=0):
    r = rng(seed)
    return [([r.standard_normal((batch, 6)).astype("float32") for _ in range(2)],
             [r.integers(0, 3, batch), r.integers(0, 2, batch)]) for _ in range(steps)]


NODES = ["enc", "enc#2", "multiply", "concatenate", "add", "norm", "tanh", "out", "head"]  # in the order called


def test_a_row_per_node_named_by_the_layers_name_in_the_model():
    report = parity.compare(two_heads(), steps=STEPS, devices=("cpu", "cpu"), data=batches())
    assert [row.split(":")[0] for row in report["layers"]] == NODES
    assert report["layers"][0].startswith("enc: Sequential( (0): Dense(6, 8, bias=True)")
    assert max(len(row) for row in report["layers"]) == 60  # cut to the report's column
    assert report["layers"][7] == "out: Dense(12, 3, bias=True)"
    assert list(report["grad_diff"]) == list(two_heads().params)
    # the same device twice: identical trajectories
    assert max(report["activation_diff"]) == 0.0 and max(report["grad_diff"].values()) == 0.0
    assert report["loss_diff"] == report["step_activation_diff"] == report["step_grad_diff"] == [0.0] * STEPS
    text = parity.format_report(report)
    assert "parity of Model: cpu vs cpu, 3 steps" in text and "node activations:" in text
    assert "\n  enc#2: Sequential(" in text and "\n  head.weight " in text


def test_recorded_nodes_are_each_steps_own_unfused_outputs():
    """Each node's recorded output is its layer's own forward on the recorded inputs of that node (every
    node alone: the model's fused chain enc.0 + ReLU and its Dense + Tanh run unfused), each step's, and the
    loss is the sum of the two heads' cross-entropies."""
    model, data, seed = two_heads(), batches(), 3
    record = parity.run(model, data, "cpu", 1e-3, seed)
    twin = parity._copy(model)
    optimizer = gn.optim.Adam(twin, lr=1e-3)
    for step, (x, y) in enumerate(data):
        values = list(x)
        for k, node in enumerate(twin._steps):
            layer = twin[node.name]
            args = [values[s] for s in node.ins] if node.many else values[node.ins[0]]
            values.append(layer.forward(args))
            numpy.testing.assert_array_equal(record[step][1][k][0], values[-1], err_msg=f"step {step + 1}, {node.name}")
        out = twin.forward(x)  # (fused, for the gradients of the same parameters)
        parts = [gn.losses.softmax_cross_entropy(o, t) for o, t in zip(out, y)]
        assert record[step][0] == pytest.approx(sum(float(v) for v, _ in parts), rel=1e-6)
        twin.backward([g for _, g in parts], input_grad=False)
        optimizer.step()
    assert any(not numpy.array_equal(record[0][2][k], record[2][2][k]) for k in record[0][2])


def test_dropout_on_a_graph_keeps_weights_and_parameter_names():
    plain = two_heads()
    rated = parity.with_dropout(two_heads(dropout=0.1), 0.3)
    assert [c["args"]["p"] for _, c in rated.to_config()["layers"] if c["type"] == "Dropout"] == [0.3]
    added = parity.with_dropout(plain, 0.3)  # none: one on each output, after every layer
    assert list(added.params) == list(plain.params)
    for name, value in plain.params.items():
        numpy.testing.assert_array_equal(added.params[name], value)
    assert [name for name, _ in added.children()][-2:] == ["output_dropout", "output_dropout_1"]
    x = [a[:2] for a in batches()[0][0]]
    for got, want in zip(added.eval().forward(x), plain.eval().forward(x), strict=True):
        numpy.testing.assert_array_equal(got, want)  # eval mode: the dropouts pass it through
    report = parity.compare(plain, steps=2, devices=("cpu", "cpu"), data=batches(), dropout=0.5)
    assert [row.split(":")[0] for row in report["layers"]][-2:] == ["output_dropout", "output_dropout_1"]
    free = parity.compare(plain, steps=2, devices=("cpu", "cpu"), data=batches())
    assert report["losses"][0][0] != free["losses"][0][0] and report["loss_diff"] == [0.0, 0.0]


def test_a_model_needs_its_batches():
    with pytest.raises(ValueError, match=r"^parity.compare: give a recipe's name, or a gpunet model with "
                                         r"data=\[\(x, y\), \.\.\.\], its training batches; got Model without data$"):
        parity.compare(two_heads())


@pytest.mark.gpu
@pytest.mark.usefixtures("our_gemm_on_the_standin")
@pytest.mark.parametrize("dropout", [None, 0.2])
def test_every_node_agrees_between_cpu_and_gpu(dropout):
    report = parity.compare(two_heads(dropout), steps=STEPS, devices=("cpu", "gpu"), data=batches(), lockstep=True)
    assert [row.split(":")[0] for row in report["layers"]] == (NODES if dropout is None else
                                                                NODES[:4] + ["drop"] + NODES[4:])
    assert 1e-4 < report["bound"] < 1e-2  # every node's sums, and both heads' cross-entropies
    assert_within_bound(report)
    assert "every step within it" in parity.format_report(report)


@pytest.mark.gpu
@pytest.mark.usefixtures("our_gemm_on_the_standin")
@pytest.mark.parametrize("bug", [("forward", _swap_first_rows), ("backward", _wrong_weight_gradient)],
                         ids=["swapped-rows", "wrong-gradient"])
def test_a_planted_bug_in_the_graph_leaves_the_bound(monkeypatch, bug):
    _planted(monkeypatch, gn.layers.Dense, bug[0], bug[1])
    report = parity.compare(two_heads(), steps=1, devices=("cpu", "gpu"), data=batches(), lockstep=True)
    with pytest.raises(AssertionError, match="> bound"):
        assert_within_bound(report)


def tiny_graph(ds):
    """Two branches over flattened images joined by Add: a graph small enough for the stand-in."""
    x = gn.Input((1, 28, 28))
    h = L.Flatten()(x)
    joined = L.Add()([L.Dense(784, 8, name="left")(h), L.Dense(784, 8, name="right")(h)])
    return gn.Model(x, L.Dense(8, ds.num_classes, name="head")(L.ReLU()(joined)))


@pytest.mark.gpu
@pytest.mark.usefixtures("our_gemm_on_the_standin")
def test_the_command_compares_a_recipe_whose_model_is_a_graph(monkeypatch, capsys):
    monkeypatch.setitem(RECIPES, "graph", Recipe(builder=tiny_graph, input_shape=(1, 28, 28), batch_size=4, lr=1e-3))
    assert main(["parity", "--model", "graph", "--steps", "2", "--batch-size", "2", "--lockstep"]) == 0
    out = capsys.readouterr().out
    assert "parity of graph: cpu vs gpu, 2 steps, in lockstep" in out and "node activations:" in out
    assert "\n  left: Dense(784, 8, bias=True) " in out and "\n  head.weight " in out
    assert "every step within it" in out


@pytest.mark.skipif("resnet" not in RECIPES, reason="no resnet recipe")
def test_the_resnet_recipe_is_compared_per_node():
    """gpunet parity --model resnet, on the CPU twice (the stand-in's emulated convolutions at 28x28 are slow)."""
    report = parity.compare("resnet", steps=1, devices=("cpu", "cpu"), batch_size=2)
    model = parity.model_and_batches("resnet", 1, 2, 0)[0]
    assert report["graph"] and [row.split(":")[0] for row in report["layers"]] == [node.name for node in model._steps]
    assert report["loss_diff"] == [0.0] and max(report["grad_diff"].values()) == 0.0
