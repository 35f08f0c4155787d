"""fit's hooks (docs/training.md): which fires when and in what order, triggers, the built-in callbacks'
order, callbacks' state saved in last.safetensors and restored on resume, and a user's callback of a
few lines that stops at an accuracy and logs to TensorBoard (read back from the event file)."""
from __future__ import annotations

import os
import signal
import struct

import numpy
import pytest

import gpunet as gn
from gpunet.training import builtin_callbacks as training_callbacks
from gpunet.training.checkpoint import read_checkpoint
from gpunet.training.callbacks import Callback, every
from gpunet.training.loop import _Run
from gpunet.training.setup import RunSetup


def data(n=48, seed=0):
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((n, 6)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")  # learnable: accuracy rises within a few epochs


def fit(out=None, epochs=3, callbacks=(), **kw):
    gn.manual_seed(1)
    model = gn.models.mlp((6, 16, 2))
    x, y = data()
    return gn.fit(model, (x[:32], y[:32]), (x[32:], y[32:]), optimizer=gn.optim.SGD(model, lr=0.2), epochs=epochs,
                  batch_size=16, out_dir=out, progress=False, restore_best=False, callbacks=list(callbacks),
                  log=kw.pop("log", lambda *a: None), **kw)


class Events(Callback):
    def __init__(self):
        self.seen = []

    def on_train_begin(self):
        self.seen.append("train_begin")

    def on_epoch_begin(self, epoch):
        self.seen.append(f"epoch_begin {epoch}")

    def on_step(self, step, loss):
        self.seen.append(f"step {step}")

    def on_batch_end(self, step, loss):
        self.seen.append(f"batch_end {step}")

    def on_epoch_end(self, epoch):
        self.seen.append(f"epoch_end {epoch}")

    def on_evaluation(self, record):
        self.seen.append(f"evaluation {record['step']}")

    def on_train_end(self):
        self.seen.append("train_end")


def test_each_hook_fires_when_the_docs_say():
    events = Events()
    fit(epochs=2, callbacks=[events])  # 32 samples, batches of 16: two steps an epoch, an evaluation at its end
    assert events.seen == ["train_begin",
                           "epoch_begin 1", "step 1", "batch_end 1", "step 2", "batch_end 2", "epoch_end 1", "evaluation 2",
                           "epoch_begin 2", "step 3", "batch_end 3", "step 4", "batch_end 4", "epoch_end 2", "evaluation 4",
                           "train_end"]


def test_a_trigger_gates_on_step_every_n_steps_or_epochs():
    by_steps, by_epochs = Events(), Events()
    by_steps.trigger, by_epochs.trigger = every(steps=3), every(epochs=2)
    fit(epochs=4, callbacks=[by_steps, by_epochs])
    assert [e for e in by_steps.seen if e.startswith("step")] == ["step 3", "step 6"]
    assert [e for e in by_epochs.seen if e.startswith("step")] == ["step 4", "step 8"]  # the ends of epochs 2 and 4
    assert by_epochs.seen.count("train_end") == 1 and "evaluation 2" in by_epochs.seen  # other hooks: ungated
    with pytest.raises(ValueError, match="every: give exactly one of steps or epochs"):
        every(steps=1, epochs=1)


def test_the_built_in_callbacks_come_in_the_documented_order():
    gn.manual_seed(1)
    model = gn.models.mlp((6, 16, 2))

    class Mine(Callback):
        pass

    run = _Run(model, None, None, gn.optim.SGD(model, lr=0.1), None, RunSetup.for_fit("cpu"),
                       loss="mse", batch_size=1, epochs=1, steps=None, eval_every=None, clip_norm=None)
    names = [type(c).__name__ for c in training_callbacks.ordered(run, [Mine()], False, 3).callbacks]
    assert names == ["ScheduleStep", "DivergenceCheck", "Progress", "EarlyStopping", "Mine", "Checkpoint",
                     "HistoryFiles"]
    assert [type(c).__name__ for c in training_callbacks.ordered(run, [], False, None).callbacks] == [
        "ScheduleStep", "DivergenceCheck", "Progress", "Checkpoint", "HistoryFiles"]


def tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value), ...]} read from the TFRecord event files in folder (length, crc, Event, crc)."""
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for name in sorted(os.listdir(folder)):
        raw = (folder / name).read_bytes()
        at = 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at:at + 8])
            event = Event.FromString(raw[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_a_short_user_callback_stops_at_an_accuracy_and_logs_to_tensorboard(tmp_path):
    class StopAtAccuracy(gn.callbacks.Callback):  # the callback of docs/training.md: under 15 lines
        def __init__(self, accuracy, log_dir):
            self.accuracy, self.board = accuracy, gn.callbacks.TensorBoard(log_dir)

        def on_evaluation(self, record):
            self.board.on_evaluation(record)
            return record["val_accuracy"] >= self.accuracy

        def on_train_end(self):
            self.board.on_train_end()

    history = fit(epochs=40, callbacks=[StopAtAccuracy(0.65, tmp_path / "tb")])
    accuracies = [r["val_accuracy"] for r in history.records]
    assert accuracies[-1] >= 0.65 and all(a < 0.65 for a in accuracies[:-1]) and len(accuracies) == 8
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert scalars["val_accuracy"] == [(r["step"], pytest.approx(r["val_accuracy"])) for r in history.records]
    assert scalars["val_loss"] == [(r["step"], pytest.approx(r["val_loss"])) for r in history.records]
    assert scalars["train_loss"] == [(r["step"], pytest.approx(r["train_loss"])) for r in history.records]
    assert "seconds" not in scalars and "step" not in scalars


class Tally(Callback):
    """A stateful callback: the steps it saw and the sum of the validation losses."""

    def __init__(self):
        self.steps, self.val_sum = 0, 0.0

    def on_step(self, step, loss):
        self.steps += 1

    def on_evaluation(self, record):
        self.val_sum += record["val_loss"]

    def state_dict(self):
        return {"steps": self.steps, "val_sum": self.val_sum}

    def load_state_dict(self, state):
        self.steps, self.val_sum = state["steps"], state["val_sum"]


class InterruptAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, step, loss):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: fit saves after this step and raises


def test_resume_keeps_a_callbacks_state_as_an_uninterrupted_run(tmp_path):
    straight = Tally()
    fit(tmp_path / "a", epochs=4, callbacks=[straight, Callback()], early_stopping=10)
    interrupted = Tally()
    with pytest.raises(gn.train.TrainingInterrupted, match="at step 5"):
        fit(tmp_path / "b", epochs=4, callbacks=[interrupted, InterruptAt(5)], early_stopping=10)
    saved = read_checkpoint(tmp_path / "b" / "last.safetensors")[2]["training"]["state"]["callbacks"]
    assert saved[3] == {"class": "EarlyStopping", "state": {"best": pytest.approx(saved[3]["state"]["best"]),
                                                           "stale": saved[3]["state"]["stale"]}}
    assert saved[4] == {"class": "Tally", "state": {"steps": 5, "val_sum": pytest.approx(interrupted.val_sum)}}
    resumed = Tally()
    fit(tmp_path / "b", epochs=4, callbacks=[resumed, Callback()], early_stopping=10, resume=True)
    assert resumed.state_dict() == pytest.approx(straight.state_dict()) and straight.steps == 8


def test_a_callback_whose_state_cannot_be_restored_starts_afresh_in_one_line(tmp_path):
    fit(tmp_path, epochs=1, callbacks=[Tally()])
    said = []

    class Other(Tally):
        pass

    other = Other()
    fit(tmp_path, epochs=2, callbacks=[other], resume=True, log=said.append)
    assert "resume: callback 3 (Other) starts afresh: the run saved the state of a Tally at its position" in said
    assert other.steps == 2  # only this run's steps
