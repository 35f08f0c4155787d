"""Graph models (gn.Input, layers called on symbolic values, merge layers, gn.Model): every output
and gradient against the same graph as a torch module with the same weights, and against float64
finite differences, on the CPU and the GPU, through gn.testing.check_layer (one definition for both
devices); shared layers summing over their calls; names; shapes checked when the model is built;
fusion inside a chain; freezing inside a graph; save and load."""
from __future__ import annotations

import numpy
import pytest
import torch
from torch import nn

import gpunet as gn
from gpunet import layers as L
from tests.support.arrays import on, rng


# ------------------------------------------------------------------ models and their torch twins

def residual():
    """A residual join, a fused chain (mid then tanh), and a head shared by two outputs."""
    x = gn.Input((6,))
    a = L.ReLU()(L.Dense(6, 5, name="fc1")(x))
    s = L.Add()([a, L.Dense(6, 5)(x)])
    head = L.Dense(5, 3, name="head")
    return gn.Model(x, [head(L.Tanh()(L.Dense(5, 5, name="mid")(s))), head(a)])


class ResidualTwin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.dense, self.mid, self.head = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        a = torch.relu(self.fc1(x))
        s = a + self.dense(x)
        return self.head(torch.tanh(self.mid(s))), self.head(a)


def siamese(nested=False):
    """Two inputs through one shared encoder (a Sequential, or a gn.Model), joined three ways; two outputs."""
    if nested:
        e = gn.Input((6,))
        encoder = gn.Model(e, L.Dense(8, 4)(L.ReLU()(L.Dense(6, 8)(e))), name="enc")
    else:
        encoder = gn.Sequential(L.Dense(6, 8), L.ReLU(), L.Dense(8, 4), name="enc")
    a, b = gn.Input((6,)), gn.Input((6,))
    ea, eb = encoder(a), encoder(b)
    joined = L.Concatenate(axis=1)([ea, eb, L.Multiply()([ea, eb])])
    return gn.Model([a, b], [L.Dense(12, 2, name="out")(joined), L.Sigmoid()(L.Dense(4, 1, name="sim")(L.Add()([ea, eb])))])


class SiameseTwin(nn.Module):
    def __init__(self, nested=False):
        super().__init__()
        if nested:
            self.enc = nn.ModuleDict({"dense": nn.Linear(6, 8), "dense_1": nn.Linear(8, 4)})
        else:
            self.enc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        self.nested, self.out, self.sim = nested, nn.Linear(12, 2), nn.Linear(4, 1)

    def encode(self, x):
        return self.enc["dense_1"](torch.relu(self.enc["dense"](x))) if self.nested else self.enc(x)

    def forward(self, a, b):
        ea, eb = self.encode(a), self.encode(b)
        return self.out(torch.cat([ea, eb, ea * eb], dim=1)), torch.sigmoid(self.sim(ea + eb))


def twin_of(model, twin):
    twin.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in model.state_dict().items()})
    return twin


CASES = {
    "residual": (residual, ResidualTwin, [(4, 6)]),
    "siamese": (siamese, SiameseTwin, [(4, 6), (4, 6)]),
    "siamese_nested": (lambda: siamese(nested=True), lambda: SiameseTwin(nested=True), [(4, 6), (4, 6)]),
}


def inputs(shapes, seed=0):
    xs = [rng(seed + i).standard_normal(s).astype("float32") for i, s in enumerate(shapes)]
    return xs if len(xs) > 1 else xs[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_graph_matches_its_torch_twin_and_float64_finite_differences(case, device):
    make, make_twin, shapes = CASES[case]
    model = make()
    gn.testing.check_layer(model, inputs(shapes), torch_module=twin_of(model, make_twin()), gpu=device == "gpu")


def test_parameters_are_keyed_by_layer_names_in_first_call_order():
    assert list(residual().params) == ["fc1.weight", "fc1.bias", "dense.weight", "dense.bias", "mid.weight",
                                       "mid.bias", "head.weight", "head.bias"]
    assert list(siamese().params)[:2] == ["enc.0.weight", "enc.0.bias"]  # a Sequential nests
    assert list(siamese(nested=True).params)[:2] == ["enc.dense.weight", "enc.dense.bias"]
    x = gn.Input((3,))
    model = gn.Model(x, L.Dense(3, 3)(L.Dense(3, 3, name="dense_1")(L.Dense(3, 3)(x))))
    assert [name for name, _ in model.children()] == ["dense", "dense_1", "dense_2"]  # defaults skip taken names


def test_a_shared_layer_sums_over_its_calls_and_then_holds_its_last_call():
    model = residual()
    head, x = model["head"], inputs([(4, 6)])
    y1, y2 = model.forward(x)
    d1, d2 = rng(7).standard_normal(y1.shape), rng(8).standard_normal(y2.shape)
    model.backward([d1.astype("float32"), d2.astype("float32")])
    inputs_of_head = [numpy.tanh(model["mid"].forward(model["add"].forward(
        [numpy.maximum(model["fc1"].forward(x), 0), model["dense"].forward(x)]))),
        numpy.maximum(model["fc1"].forward(x), 0)]
    want = d1.T @ inputs_of_head[0].astype("float64") + d2.T @ inputs_of_head[1].astype("float64")
    got = numpy.asarray(head.grads["weight"], "float64")
    # float32 sums of 4 rows per call, then one add: within 8 ulps of the sum of |terms|
    bound = 8 * 2.0**-24 * (numpy.abs(d1.T) @ numpy.abs(inputs_of_head[0]) + numpy.abs(d2.T) @ numpy.abs(inputs_of_head[1]))
    assert (numpy.abs(got - want) <= bound).all()
    head.backward(d2.astype("float32"))  # a direct backward refers to the layer's last call: head(a)
    numpy.testing.assert_array_equal(head.grads["weight"], (d2.astype("float32").T @ inputs_of_head[1]))


def test_chains_run_fused():
    model = residual()
    fused = {step.name: [model._steps[j].name for j in step.absorbed] for step in model._steps if step.absorbed}
    # fc1's output feeds relu alone (relu's own output, read twice, is the fused step's); add's output feeds mid and
    # mid's tanh; mid cannot take add (not a layer that absorbs), and the outputs are read by the model
    assert fused == {"fc1": ["relu"], "mid": ["tanh"]}


def test_names_are_identifiers_and_unique():
    with pytest.raises(ValueError, match=r"^Dense: name must be an identifier \(letters, digits and _, no dots\), "
                                         r"got 'fc.1'$"):
        L.Dense(2, 2, name="fc.1")
    with pytest.raises(ValueError, match="name must be an identifier"):
        L.ReLU(name=3)
    x = gn.Input((2,))
    with pytest.raises(ValueError, match=r"^gn.Model: two layers are named 'a' \(Dense\(2, 2, bias=True\) and ReLU\(\)\)"):
        gn.Model(x, L.ReLU(name="a")(L.Dense(2, 2, name="a")(x)))


def test_a_users_layer_takes_a_name_without_declaring_it():
    class Twice(L.Layer):
        def forward(self, x):
            self.save_for_backward()
            return 2 * x

        def backprop(self, dy, saved, need_dx):
            return 2 * dy

    layer = Twice(name="double")
    assert layer.name == "double"
    x = gn.Input((3,))
    model = gn.Model(x, L.Dense(3, 1)(layer(x)))
    assert [name for name, _ in model.children()] == ["double", "dense"]


def test_a_shape_mismatch_names_both_layers_and_both_shapes():
    x = gn.Input((1, 8, 8))
    h = L.Conv2D(1, 4, 3, name="conv")(x)
    with pytest.raises(ValueError, match=r"^layer 'fc' \(Dense\(10, 2, bias=True\)\) cannot take the output of layer "
                                         r"'conv' \(Conv2D\(.*\)\), shape \(None, 4, 6, 6\) float32: .*expected input "
                                         r"with last dimension 10, got shape \(1, 4, 6, 6\)$"):
        L.Dense(10, 2, name="fc")(h)
    with pytest.raises(ValueError, match=r"Add\(\) cannot take the output of layer 'conv'.*\(None, 4, 6, 6\).* and "
                                         r"the output of a gn.Input, shape \(None, 1, 8, 8\).*one shape"):
        L.Add()([h, x])


def test_building_leaves_running_statistics_modes_and_saved_state_alone():
    norm = L.BatchNorm1d(3)
    before = numpy.array(norm.buffers["running_mean"])
    x = gn.Input((3,))
    gn.Model(x, norm(x))
    numpy.testing.assert_array_equal(norm.buffers["running_mean"], before)
    assert norm.training and norm._saved is None


def test_refusals_are_one_line():
    x, other = gn.Input((3,)), gn.Input((3,))
    y = L.Add()([x, other])
    with pytest.raises(ValueError, match=r"^gn.Model: the outputs depend on a gn.Input of shape \(3,\) that is not in inputs$"):
        gn.Model(x, y)
    with pytest.raises(ValueError, match="every item of inputs must be a gn.Input"):
        gn.Model(y, y)
    with pytest.raises(TypeError, match="must be a symbolic value"):
        gn.Model(x, numpy.zeros(3))
    with pytest.raises(ValueError, match=r"^gn.Input: shape must be a tuple of positive ints"):
        gn.Input((0, 3))
    with pytest.raises(TypeError, match="mixing symbolic values and arrays"):
        L.Add()([x, numpy.zeros((1, 3), "float32")])
    model = gn.Model([x, other], y)
    with pytest.raises(ValueError, match=r"^gn.Model: expected a list of 2 input arrays .*got one ndarray$"):
        model.forward(numpy.zeros((2, 3), "float32"))
    with pytest.raises(RuntimeError, match="^gn.Model: backward called before forward$"):
        model.backward(numpy.zeros((2, 3), "float32"))
    with pytest.raises(TypeError, match="is symbolic"):
        numpy.asarray(x)


def test_a_frozen_branch_gets_no_parameter_gradients_and_still_passes_its_input_gradient(device):
    model = siamese().to(device)
    model["enc"].freeze()
    sentinel = {k: numpy.array(gn.to_numpy(v)) for k, v in model["enc"].grads.items()}
    for k in model["enc"].grads:
        model["enc"].grads[k][...] = on(device, numpy.full(sentinel[k].shape, 7.0, "float32"))
    xs = [on(device, a) for a in inputs([(4, 6), (4, 6)])]
    ys = model.forward(xs)
    dxs = model.backward([y * 0 + 1 for y in ys])
    assert all(float(abs(gn.to_numpy(d)).sum()) > 0 for d in dxs)  # the input gradients are computed
    assert all((gn.to_numpy(v) == 7.0).all() for v in model["enc"].grads.values())  # the frozen encoder's: not
    assert float(abs(gn.to_numpy(model["out"].grads["weight"])).sum()) > 0


def test_save_and_load_keep_the_graph_names_and_outputs(tmp_path):
    model = siamese(nested=True)
    model["out"].freeze()
    path = gn.save(model, tmp_path / "model.safetensors")
    back = gn.load(path)
    assert list(back.params) == list(model.params) and back["out"].frozen and not back["sim"].frozen
    xs = inputs([(4, 6), (4, 6)])
    for got, want in zip(back.forward(xs), model.forward(xs)):
        numpy.testing.assert_array_equal(got, want)  # the same weights and ops on one machine: the same bits
    assert back.to_config() == model.to_config()


def test_a_nested_model_giving_a_list_of_one_output_is_unpacked():
    e = gn.Input((3,))
    inner = gn.Model(e, [L.Dense(3, 2)(e)])
    x = gn.Input((3,))
    model = gn.Model(x, L.ReLU()(inner(x)[0]))
    y = model.forward(numpy.ones((2, 3), "float32"))
    assert y.shape == (2, 2)
    assert model.backward(numpy.ones((2, 2), "float32")).shape == (2, 3)
    assert gn.layers.build_layer(model.to_config()).forward(numpy.ones((2, 3), "float32")).shape == (2, 2)


def test_a_one_input_layer_refuses_a_list_of_symbolic_values():
    v = gn.Input((3,))
    with pytest.raises(TypeError, match=r"^ReLU\(\) takes one input, got a list of 1 symbolic values"):
        L.ReLU()([v])


def test_the_summary_lists_a_graphs_nodes_and_counts_a_shared_layer_once():
    from gpunet.summary import summary
    table = summary(residual(), (6,)).splitlines()
    assert [line.split(":")[0] for line in table[2:-1]] == ["fc1", "relu", "dense", "add", "mid", "tanh", "head", "head"]
    assert table[-1].split() == ["total", f"{residual().num_params():,}"]
    assert table[-2].split()[-1] == "0" and table[-3].split()[-1] == "18"  # head: 5 * 3 + 3 once
