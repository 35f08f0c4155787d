"""gn.testing.check_layer, the public check of a layer's backward (issue 29 item 8): every built-in
layer passes it, a backward wrong in one element is reported with that element and both values,
the user's layer is left as it was, a PyTorch twin and the GPU (the stand-in here) are compared,
and docs/layers.md's example runs as shown."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from gpunet.backend import ops_for
from tests.layers.test_protocol import CASES as PROTOCOL_CASES
from tests.layers.test_protocol import make_input as protocol_input
from tests.support.arrays import on, rng

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(-?[0-9.]+(?:e[-+][0-9]+)?)"

# every registered built-in layer but Perceptron (no backward: below), with tests/layers/test_protocol.py's
# constructors and inputs; dropout active inside a composite, to check the one fixed mask there too
CASES = {name: case for name, case in PROTOCOL_CASES.items() if name != "Perceptron"} | {
    "TransformerBlock": (lambda: L.TransformerBlock(4, 2, mlp_ratio=2, dropout=0.2), (2, 3, 4)),
    "Sequential": (lambda: gn.Sequential(L.Dense(3, 4), L.ReLU(), L.Dropout(0.3), L.Dense(4, 2)), (2, 3)),
}
IDS = numpy.array([[1, 4, 1], [0, 4, 2]])  # Embedding's input: ids, repeated so rows' gradients add


def make_input(shape):
    return IDS if shape == "ids" else protocol_input(shape, seed=3)


def test_the_cases_cover_every_built_in_layer_type():
    built_in = {name for name, cls in L.LAYER_TYPES.items() if cls.__module__.startswith("gpunet.")}
    assert built_in == set(CASES) | {"Perceptron"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_built_in_layer_passes(case):
    make, shape = CASES[case]
    assert gn.testing.check_layer(make(), make_input(shape), gpu=False) is None


def test_perceptron_has_no_backward_to_check():
    with pytest.raises(TypeError, match="^Perceptron is trained by the perceptron rule"):
        gn.testing.check_layer(gn.models.Perceptron(3), make_input((2, 3)), gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["Dense", "Dropout", "LayerNorm", "Embedding"])
def test_built_in_layers_pass_on_the_gpu_too(case):
    make, shape = CASES[case]
    gn.testing.check_layer(make(), make_input(shape), gpu=True)


# ------------------------------------------------------------------ a user's own layer

@gn.layers.register("CheckLayerTestScale")
class Scale(gn.layers.Layer):
    """y = x * weight (one weight per feature); `wrong` plants a bug in one element of a gradient."""

    def __init__(self, features: int, wrong: str = ""):
        super().__init__(features=features, wrong=wrong)
        self.add_param("weight", numpy.linspace(0.5, 1.5, features).astype("float32"))
        self.wrong = wrong

    def forward(self, x):
        self.save_for_backward(x=x)
        return x * self.params["weight"]

    def backprop(self, dy, saved, need_dx):
        self.grads["weight"][...] = (dy * saved.x).sum(axis=0)
        if self.wrong == "weight":
            self.grads["weight"][2] *= 1.5
        dx = dy * self.params["weight"]
        if self.wrong == "input":
            dx[1, 3] = 0.0
        return dx if need_dx else None


def exact_gradients(layer, x, seed=0):
    """The right input and weight gradients for check_layer's upstream gradient (drawn as it draws it)."""
    x64 = x.astype("float64")
    dy = numpy.random.default_rng(seed).standard_normal(x.shape)
    return dy * layer.params["weight"].astype("float64"), (dy * x64).sum(axis=0)


def values_in(message):
    """(backward's value, the finite difference, the tolerance) as the message prints them."""
    found = re.search(f"backward gave {NUMBER}, float64 central differences {NUMBER} "
                      fr"\(\|diff\| {NUMBER} > tolerance {NUMBER}\)$", message)
    assert found, message
    return float(found[1]), float(found[2]), float(found[4])


def test_a_correct_custom_layer_passes():
    assert gn.testing.check_layer(Scale(5), make_input((4, 5))) is None  # on the stand-in GPU too


def test_a_parameter_gradient_wrong_in_one_element_is_named_with_both_values():
    layer, x = Scale(5, wrong="weight"), make_input((4, 5))
    with pytest.raises(AssertionError) as caught:
        gn.testing.check_layer(layer, x, gpu=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("check_layer: Scale: gradient of 'weight' is wrong at element (2,): ")
    analytic, numeric, tolerance = values_in(message)
    right = exact_gradients(layer, x)[1][2]
    assert abs(analytic - 1.5 * right) <= 1e-7 * abs(right)  # backward's float64 value, printed to 9 digits
    assert abs(numeric - right) <= 1e-7 * abs(right)
    assert 0 < tolerance <= 1e-5 * abs(right) + 1e-7


def test_an_input_gradient_wrong_in_one_element_is_named_with_both_values():
    layer, x = Scale(5, wrong="input"), make_input((4, 5))
    with pytest.raises(AssertionError) as caught:
        gn.testing.check_layer(layer, x, gpu=False)
    message = str(caught.value)
    assert message.startswith("check_layer: Scale: input gradient is wrong at element (1, 3): backward gave 0, ")
    analytic, numeric, _ = values_in(message)
    right = exact_gradients(layer, x)[0][1, 3]
    assert analytic == 0.0 and abs(numeric - right) <= 1e-7 * abs(right) and abs(right) > 0.01


def test_a_large_tensor_is_checked_in_a_seeded_sample():
    """Beyond max_elements, that many elements drawn with the seed: the planted element 2 of the
    weight is missed by a seed whose sample leaves it out, and caught by one whose sample holds it."""
    from gpunet.testing import _indices
    assert _indices((2, 3), 6, 0) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # every element, in order
    holds = {seed: (2,) in _indices((5,), 2, seed) for seed in range(20)}
    missed, seen = min(s for s in holds if not holds[s]), min(s for s in holds if holds[s])
    x = make_input((4, 5))
    gn.testing.check_layer(Scale(5, wrong="weight"), x, gpu=False, max_elements=2, seed=missed)
    with pytest.raises(AssertionError, match=r"gradient of 'weight' is wrong at element \(2,\)"):
        gn.testing.check_layer(Scale(5, wrong="weight"), x, gpu=False, max_elements=2, seed=seen)


def state_of(layer):
    """Everything of the layer check_layer must not change, as bytes and flags."""
    def stores(kind):
        return {k: (gn.to_numpy(v).tobytes(), str(v.dtype), type(v)) for k, v in getattr(layer, kind).items()}
    return stores("params"), stores("grads"), stores("buffers"), layer.training, layer.device, layer._saved


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_the_users_layer_and_random_state_are_left_as_they_were(device):
    # (a bias before the batch norm: its exact gradient is 0, both devices' values rounding noise of the size of the
    # gradient reaching the Dense, which the bound allows)
    model = gn.Sequential(L.Dense(3, 4), L.BatchNorm1d(4), L.Dropout(0.2), L.Dense(4, 2))
    model.to(device)
    model.forward(on(device, make_input((5, 3))))  # a last forward, whose saved arrays must stay
    model.backward(on(device, rng(1).standard_normal((5, 2)).astype("float32")))
    before, random_before = state_of(model), gn.random.get_state()
    step_before = gn.random.current_step()
    gn.testing.check_layer(model, make_input((5, 3)), gpu=device == "gpu")
    after = state_of(model)
    assert after[:5] == before[:5] and after[5] is before[5]
    assert model[0].params["weight"].dtype == numpy.float32 and model.device == device
    assert gn.random.get_state() == random_before and gn.random.current_step() == step_before


def test_refusals_are_one_line():
    with pytest.raises(TypeError, match=r"^check_layer: layer is Linear, not a gpunet layer \(gpunet.layers.Layer\)$"):
        gn.testing.check_layer(torch.nn.Linear(2, 2), make_input((2, 2)))
    with pytest.raises(TypeError, match=r"^check_layer: x must be a non-empty array of numbers \(floats, or integer "
                                        r"ids\), got dtype <U1 and shape \(2,\)$"):
        gn.testing.check_layer(L.ReLU(), ["a", "b"])


# ------------------------------------------------------------------ a PyTorch twin

def twin_of(dense):
    linear = torch.nn.Linear(dense.config["in_features"], dense.config["out_features"])
    linear.load_state_dict({k: torch.from_numpy(gn.to_numpy(v).copy()) for k, v in dense.state_dict().items()})
    return linear


def test_dense_matches_its_torch_twin_and_the_twin_is_left_as_it_was():
    dense = L.Dense(5, 3)
    linear = twin_of(dense).double()  # a float64 twin: compared in float32, on a copy
    gn.testing.check_layer(dense, make_input((4, 5)), torch_module=linear, gpu=False)
    assert linear.weight.dtype == torch.float64 and linear.weight.grad is None


def test_a_model_matches_the_twin_gn_export_makes():
    model = gn.Sequential(L.Dense(3, 4), L.BatchNorm1d(4), L.Tanh(), L.Dense(4, 2))
    model.eval()  # BatchNorm's running statistics: away from their start, so a wrong one shows
    model[1].buffers["running_mean"][...] = rng(5).standard_normal(4)
    twin = gn.export.to_torch(model).eval()
    gn.testing.check_layer(model, make_input((5, 3)), torch_module=twin, gpu=False)
    twin[1].running_var.fill_(2.0)
    with pytest.raises(AssertionError, match=r"^check_layer: Sequential: state_dict '1.running_var' differs at "
                                             r"element \(0,\): the layer 1, torch_module 2 "):
        gn.testing.check_layer(model, make_input((5, 3)), torch_module=twin, gpu=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_a_bias_before_a_batch_norm_in_training_is_held_to_the_gradient_reaching_it(device):
    """The bias's exact gradient is 0 (the norm's mean removes it): gpunet's, torch's and the GPU's are rounding noise
    of the size of the gradient reaching the Dense, which the bound allows; a wrong one is still caught."""
    class Planted(L.Dense):  # the bias's gradient 1% of the gradient reaching it off, in one element
        def backprop(self, dy, saved, need_dx):
            dx = super().backprop(dy, saved, need_dx)
            self.grads["bias"][1] += 0.01 * float(numpy.abs(gn.to_numpy(dy)).max())
            return dx

    for make, fails in ((L.Dense, False), (Planted, True)):
        gn.manual_seed(3)
        model = gn.Sequential(make(3, 4), L.BatchNorm1d(4), L.Dense(4, 2))
        twin = gn.export.to_torch(gn.Sequential(L.Dense(3, 4), L.BatchNorm1d(4), L.Dense(4, 2)).train())
        twin.load_state_dict({k: torch.from_numpy(gn.to_numpy(v).copy()) for k, v in model.state_dict().items()})
        if not fails:
            gn.testing.check_layer(model, make_input((6, 3)), torch_module=twin.train(), gpu=device == "gpu")
            continue
        with pytest.raises(AssertionError, match=r"gradient of '0.bias' (is wrong|differs) at element \(1,\)"):
            gn.testing.check_layer(model, make_input((6, 3)), torch_module=twin.train(), gpu=device == "gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_a_gpu_only_error_in_a_weight_is_caught_whatever_the_input_size(scale):
    """The bias floor does not reach weights: with inputs of size 1e-3 the batch norm's backward makes the gradient
    reaching the Dense about 1e3 while its weight's gradient stays about 1; a weight element 2% off on the GPU alone
    (the CPU's and float64 checks pass) is still reported."""
    class OffOnTheGpu(L.Dense):
        def backprop(self, dy, saved, need_dx):
            dx = super().backprop(dy, saved, need_dx)
            if self.device == "gpu":
                g = self.grads["weight"]
                g.ravel()[0] += 0.02 * float(numpy.abs(gn.to_numpy(g)).max())
            return dx

    gn.manual_seed(3)
    model = gn.Sequential(OffOnTheGpu(3, 4), L.BatchNorm1d(4), L.Dense(4, 2))
    x = (make_input((6, 3)) * scale).astype("float32")
    with pytest.raises(AssertionError, match=r"gradient of '0.weight' differs at element \(0, 0\): the GPU"):
        gn.testing.check_layer(model, x, gpu=True)


def test_a_twin_with_other_weights_is_caught():
    dense = L.Dense(5, 3)
    linear = twin_of(dense)
    with torch.no_grad():
        linear.weight[1, 2] += 0.25
    with pytest.raises(AssertionError) as caught:
        gn.testing.check_layer(dense, make_input((4, 5)), torch_module=linear, gpu=False)
    mine = float(dense.params["weight"][1, 2])
    assert str(caught.value) == (
        f"check_layer: Dense: state_dict 'weight' differs at element (1, 2): the layer {mine:.9g}, torch_module "
        f"{numpy.float32(mine + 0.25):.9g} (|diff| 0.25 > tolerance 0); give the twin the layer's weights "
        "(gn.export.to_torch, or torch_module.load_state_dict)")


def test_a_twin_whose_gradient_differs_is_caught():
    """The same weights but another function (a ReLU after it): the output differs where z < 0."""
    dense = L.Dense(5, 3)
    twin = torch.nn.Sequential()
    twin.add_module("inner", twin_of(dense))
    with pytest.raises(AssertionError, match=r"state_dict names differ: missing \['bias', 'weight'\], unexpected "
                                             r"\['inner.bias', 'inner.weight'\]$"):
        gn.testing.check_layer(dense, make_input((4, 5)), torch_module=twin, gpu=False)

    class Clipped(torch.nn.Linear):
        def forward(self, x):
            return torch.relu(super().forward(x))

    clipped = Clipped(5, 3)
    clipped.load_state_dict(twin_of(dense).state_dict())
    with pytest.raises(AssertionError, match=r"^check_layer: Dense: output differs at element \(\d+, \d+\): gpunet "):
        gn.testing.check_layer(dense, make_input((4, 5)), torch_module=clipped, gpu=False)


def test_a_twin_is_refused_with_dropout_active():
    with pytest.raises(ValueError, match=r"^check_layer: Dropout has dropout active in training mode"):
        gn.testing.check_layer(L.Dropout(0.5), make_input((2, 3)), torch_module=torch.nn.Dropout(0.5), gpu=False)
    gn.testing.check_layer(L.Dropout(0.5).eval(), make_input((2, 3)), torch_module=torch.nn.Dropout(0.5).eval(),
                           gpu=False)


# ------------------------------------------------------------------ CPU against GPU

class GPUOffByOne(Scale):
    """Right on the CPU; on the GPU the weight gradient's last element is off (a device-only bug)."""

    def backprop(self, dy, saved, need_dx):
        dx = super().backprop(dy, saved, need_dx)
        if self.device == "gpu":
            self.grads["weight"][-1] += 1.0
        return dx


@pytest.mark.gpu
def test_a_gradient_wrong_only_on_the_gpu_is_caught():
    layer = GPUOffByOne(4)
    with pytest.raises(AssertionError, match=r"^check_layer: GPUOffByOne: gradient of 'weight' differs at element "
                                             r"\(3,\): the GPU -?[0-9.]+, the CPU -?[0-9.]+ \(\|diff\| 1 > tolerance "):
        gn.testing.check_layer(layer, make_input((3, 4)))
    assert ops_for(layer.params["weight"]).xp is numpy  # the layer itself stayed on the CPU


# ------------------------------------------------------------------ the docs page

def test_the_docs_example_runs_and_is_shown_whole():
    example = ROOT / "docs" / "examples" / "custom_layer.py"
    page = (ROOT / "docs" / "layers.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert example.read_text(encoding="utf-8") in blocks, "docs/layers.md shows docs/examples/custom_layer.py whole"
    run = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["Swish: every gradient matches float64 finite differences",
                                       "Dense: matches torch.nn.Linear"]


def test_the_docs_bug_is_reported_as_the_docs_show(tmp_path):
    example = (ROOT / "docs" / "examples" / "custom_layer.py").read_text(encoding="utf-8")
    planted = example.replace("return dy * s + ds * beta if need_dx else None", "return dy * s if need_dx else None")
    assert planted != example
    (tmp_path / "planted.py").write_text(planted, encoding="utf-8")
    run = subprocess.run([sys.executable, str(tmp_path / "planted.py")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stdout == ""
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("AssertionError: check_layer: Swish: input gradient is wrong at element (0, 0): ")
    shown = re.search(r"```text\n(AssertionError: .*)\n```", (ROOT / "docs" / "layers.md").read_text(encoding="utf-8"))
    # the same line, but for the last digits: float64 exp may differ by an ulp across CPUs, which the
    # finite difference magnifies by 1 / eps
    assert values_in(last.removeprefix("AssertionError: ")) == pytest.approx(
        values_in(shown[1].removeprefix("AssertionError: ")), rel=1e-6)
    assert re.sub(NUMBER, "#", last) == re.sub(NUMBER, "#", shown[1])
