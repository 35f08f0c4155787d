"""fit(..., callbacks=[...]): on_step after every optimizer step, on_evaluation after every evaluation,
True from on_evaluation stops; EarlyStopping as a callback equals fit's early_stopping."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.training.callbacks import Callback, EarlyStopping


def problem(n=200, seed=0):
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((n, 8)).astype("float32")
    y = r.integers(0, 3, n)  # random labels: the validation loss soon rises, so early stopping triggers
    return x, y


def train(epochs=30, out=None, **kw):
    gn.manual_seed(3)
    model = gn.models.mlp((8, 32, 3))
    x, y = problem()
    history = gn.fit(model, (x[:150], y[:150]), (x[150:], y[150:]), optimizer=gn.optim.Adam(model, lr=0.02),
                     epochs=epochs, batch_size=32, out_dir=out, progress=False, restore_best=False, **kw)
    return model, history


def without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_early_stopping_callback_equals_early_stopping_argument():
    builtin_model, builtin = train(early_stopping=3)
    callback_model, by_callback = train(callbacks=[EarlyStopping(3)])
    assert len(builtin.records) < 30  # it did stop early
    assert without_time(by_callback.records) == without_time(builtin.records)
    for key, value in builtin_model.state_dict().items():
        numpy.testing.assert_array_equal(callback_model.state_dict()[key], value, err_msg=key)


def test_early_stopping_on_train_loss_without_validation_data():
    def run(**kw):
        gn.manual_seed(3)
        model = gn.models.mlp((8, 32, 3))
        x, y = problem()
        return gn.fit(model, (x, y), optimizer=gn.optim.SGD(model, lr=3.0), epochs=30, batch_size=32,
                      progress=False, **kw)

    builtin, by_callback = run(early_stopping=2), run(callbacks=[EarlyStopping(2)])
    assert len(builtin.records) < 30
    assert without_time(by_callback.records) == without_time(builtin.records)


class Recorder(Callback):
    def __init__(self):
        self.steps, self.losses, self.records = [], [], []

    def on_step(self, step, loss):
        self.steps.append(step)
        self.losses.append(float(loss))

    def on_evaluation(self, record):
        self.records.append(dict(record))


def test_hooks_see_every_step_and_every_evaluation():
    recorder = Recorder()
    _, history = train(epochs=3, callbacks=[recorder])
    assert recorder.steps == list(range(1, 3 * 5 + 1))  # 150 samples in batches of 32: 5 steps an epoch
    assert recorder.records == history.records
    previous = 0
    for record in history.records:  # each record's train_loss is the mean of its steps' losses
        assert record["train_loss"] == pytest.approx(numpy.mean(recorder.losses[previous:record["step"]]), rel=1e-6)
        previous = record["step"]


def test_a_true_from_on_evaluation_stops_after_that_evaluations_checkpoints(tmp_path):
    class StopAtSecond:
        def __init__(self):
            self.seen = 0

        def on_evaluation(self, record):
            self.seen += 1
            return self.seen == 2

    everyone = Recorder()  # every callback is called, also after one asked to stop
    _, history = train(epochs=10, out=tmp_path, callbacks=[StopAtSecond(), everyone])
    assert [r["step"] for r in history.records] == [5, 10]
    assert len(everyone.records) == 2
    assert (tmp_path / "last.safetensors").exists() and (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("callbacks, message", [
    (EarlyStopping(2), "fit: callbacks must be a list of callbacks, got EarlyStopping"),
    ([Recorder(), object()], r"fit: callbacks\[1\] \(object\) has neither on_step nor on_evaluation"),
])
def test_bad_callbacks_are_refused_before_training(callbacks, message):
    with pytest.raises(TypeError, match=message):
        train(epochs=1, callbacks=callbacks)


def test_early_stopping_names_a_missing_monitor():
    model = gn.models.mlp((8, 3))  # (one model: fit refuses an optimizer made with another)
    with pytest.raises(ValueError, match=r"EarlyStopping: the evaluation record has no 'val_accuracy' to monitor"):
        gn.fit(model, (problem()[0], problem()[1].astype("float32")[:, None].repeat(3, 1)),
               optimizer=gn.optim.SGD(model, 0.1), loss="mse", epochs=1, progress=False,
               callbacks=[EarlyStopping(1, monitor="val_accuracy")])
