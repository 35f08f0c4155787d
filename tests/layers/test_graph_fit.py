"""gn.fit and gn.evaluate on a gn.Model with two inputs and two outputs: the same training as a torch
loop over the same graph and batches (float64), per-output records, the refusals."""
from __future__ import annotations

import numpy
import pytest
import torch
from torch import nn

import gpunet as gn
from gpunet import layers as L
from tests.support.arrays import rng
from tests.support.reliability import one_error_line

LOSS, WEIGHTS = ["softmax_cross_entropy", "mse"], [1.0, 0.25]


def two_by_two():
    a, b = gn.Input((5,)), gn.Input((3,))
    h = L.Tanh()(L.Dense(8, 6, name="fc")(L.Concatenate()([a, b])))
    return gn.Model([a, b], [L.Dense(6, 4, name="cls")(h), L.Dense(6, 2, name="reg")(L.Add()([h, L.Dense(5, 6, name="skip")(a)]))])


class Twin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.cls, self.reg, self.skip = nn.Linear(8, 6), nn.Linear(6, 4), nn.Linear(6, 2), nn.Linear(5, 6)

    def forward(self, a, b):
        h = torch.tanh(self.fc(torch.cat([a, b], dim=1)))
        return self.cls(h), self.reg(h + self.skip(a))


def data(n=96):
    r = rng(5)
    a, b = r.standard_normal((n, 5)), r.standard_normal((n, 3))
    return [a, b], [r.integers(0, 4, n), r.standard_normal((n, 2))]


def test_fit_with_two_inputs_and_outputs_trains_as_torch_does():
    """Full batches (the shuffled order changes no sum but its order), SGD with momentum, 8 steps, float64."""
    model = two_by_two().to(dtype="float64")
    twin = Twin().double()
    twin.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in model.state_dict().items()})
    x, y = data()
    gn.fit(model, (x, y), optimizer=gn.optim.SGD(model, lr=0.1, momentum=0.9), steps=8, batch_size=96,
           loss=LOSS, loss_weights=WEIGHTS, progress=False, log=lambda *a: None)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    ta, tb = (torch.from_numpy(v) for v in x)
    for _ in range(8):
        opt.zero_grad()
        cls, reg = twin(ta, tb)
        loss = (WEIGHTS[0] * nn.functional.cross_entropy(cls, torch.from_numpy(y[0]))
                + WEIGHTS[1] * nn.functional.mse_loss(reg, torch.from_numpy(y[1])))
        loss.backward()
        opt.step()
    # float64 both: each step's sums (K <= 96 terms) round within gamma_K on each side; SGD adds them over 8 steps
    # with momentum 0.9 (a factor of at most 1 / (1 - 0.9) = 10), so 8 * 10 * 2 * 96 u of each tensor's size
    bound = 8 * 10 * 2 * 96 * 2.0**-53
    for name, value in twin.state_dict().items():
        want = value.numpy()
        diff = numpy.abs(model.params[name] - want).max() / numpy.abs(want).max()
        assert diff <= bound, f"{name}: relative difference {diff:.2e} > {bound:.2e}"


def test_evaluate_reports_the_weighted_total_and_each_output():
    model = two_by_two().to(dtype="float64")
    x, y = data()
    got = gn.evaluate(model, x, y, loss=LOSS, loss_weights=WEIGHTS, batch_size=40)
    cls, reg = model.forward(x)
    ce = float(gn.losses.softmax_cross_entropy(cls, y[0])[0])
    mse = float(((reg - y[1]) ** 2).mean())
    accuracy = float((cls.argmax(axis=1) == y[0]).mean())
    # batches of 40, 40 and 16 summed in float64 against one mean: a few roundings of each mean
    assert got["loss_0"] == pytest.approx(ce, rel=1e-13) and got["loss_1"] == pytest.approx(mse, rel=1e-13)
    assert got["loss"] == pytest.approx(ce + 0.25 * mse, rel=1e-13)
    assert got["accuracy_0"] == accuracy and "accuracy_1" not in got and got["samples"] == 96


def test_validation_records_carry_each_outputs_loss_and_accuracy():
    model = two_by_two().to(dtype="float64")
    x, y = data()
    history = gn.fit(model, (x, y), (x, y), optimizer=gn.optim.Adam(model, lr=1e-2), steps=3, batch_size=32,
                     loss=LOSS, loss_weights=WEIGHTS, progress=False, log=lambda *a: None)
    record = history[-1]
    assert {"val_loss", "val_loss_0", "val_accuracy_0", "val_loss_1"} <= set(record)
    assert record["val_loss"] == pytest.approx(record["val_loss_0"] + 0.25 * record["val_loss_1"], rel=1e-12)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: gn.fit(m, (x[0], y), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, loss=LOSS),
     r"^training data: the model takes 2 inputs; give a list of 2 arrays \(in the order of its inputs\), got one ndarray$"),
    (lambda m, x, y: gn.fit(m, (x, y[0]), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, loss=LOSS),
     r"^training data: the model has 2 outputs \(one loss each\); give a list of 2 target arrays, got one ndarray$"),
    (lambda m, x, y: gn.fit(m, (x, y), optimizer=gn.optim.SGD(m, lr=0.1), steps=1),
     r"^fit: the model has 2 outputs, and loss is one loss \('softmax_cross_entropy'\); give a list of one loss"),
    (lambda m, x, y: gn.fit(m, ([x[0], x[1][:10]], y), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, loss=LOSS),
     r"^training data: input 1 has 10 samples but input 0 has 96$"),
    (lambda m, x, y: gn.fit(m, (x, y), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, loss=LOSS, loss_weights=[1.0]),
     r"^fit: loss_weights must be 2 finite numbers >= 0, one per loss, got \[1.0\]$"),
    (lambda m, x, y: gn.fit(m, (x, y), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, loss=["mse", "hinge"]),
     r"^fit: unknown loss 'hinge' in loss=\['mse', 'hinge'\]"),
    (lambda m, x, y: gn.fit(m, (x, y), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, loss="mse", loss_weights=[1.0]),
     r"^fit: loss_weights is for a list of losses"),
    (lambda m, x, y: gn.fit(m, (x, y), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, loss=["mse"]),
     r"^fit: the model has 2 outputs, and loss is a list of 1 losses; give a list of one loss per output"),
])
def test_refusals_are_one_line(call, message):
    model = two_by_two().to(dtype="float64")
    x, y = data()
    with pytest.raises((ValueError, TypeError), match=message) as raised:
        call(model, x, y)
    assert one_error_line(str(raised.value))


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_the_command_line_refuses_a_model_of_several_inputs_in_one_line(tmp_path, command):
    import subprocess
    import sys
    path = gn.save(two_by_two(), tmp_path / "model.safetensors")
    images = tmp_path / "images.npy"
    numpy.save(images, numpy.zeros((2, 5), "float32"))
    extra = ["--labels", str(images)] if command == "eval" else []
    done = subprocess.run([sys.executable, "-m", "gpunet", command, str(path), "--images", str(images), *extra],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    line = one_error_line(done.stderr)
    assert line.startswith(f"gpunet {command}: {path} is a graph model with several inputs and outputs; the command "
                           "line takes one image input and one output")
