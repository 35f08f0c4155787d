"""Hooks into fit: `fit(..., callbacks=[...])` calls each callback's hooks around the training step;
an on_evaluation that returns True stops training (after that evaluation's checkpoints are written,
as early_stopping does). fit's own work around the step (the schedule, the divergence watch, the
progress bar, early stopping, checkpoints, the history files) is done by built-in callbacks with the
same hooks (gpunet.training.builtin_callbacks); docs/training.md says which hook fires when, and in what order.

A callback is any object with one of HOOKS (derive from Callback to get all of them as no-ops):

    class PrintLoss(gn.callbacks.Callback):
        def on_evaluation(self, record):
            print(record["step"], record["val_loss"])

on_step(step, loss): `step` counts optimizer steps from 1; `loss` is that step's mean training loss,
a 0-d array on the model's device (float(loss) reads it, and on a GPU makes the host wait for the step).
on_batch_end(step, loss): after each batch; the same as on_step, unless fit accumulates gradients
(accumulate=N): then after each of the step's N batches, with the number of the step they go into and
the batch's own mean loss, and on_step after the last of them.
on_evaluation(record): the record just appended to the history (the same dict as history.json's).
on_train_begin(), on_train_end(), on_epoch_begin(epoch), on_epoch_end(epoch): epoch counts from 1.
A callback with a `trigger` (every(steps=N) or every(epochs=N)) gets on_step and on_batch_end only
when it fires, as a Chainer extension does. A callback that keeps state gives it as a JSON-able dict
(state_dict() / load_state_dict(state)): it is saved in last.safetensors and restored on resume.
"""
from __future__ import annotations

import math

from gpunet import validate

__all__ = ["Callback", "EarlyStopping", "TensorBoard", "Trigger", "every"]

HOOKS = ("on_train_begin", "on_epoch_begin", "on_step", "on_batch_end", "on_epoch_end", "on_evaluation",
         "on_train_end")


class Trigger:
    """Fires every `n` optimizer steps (unit "step") or at the end of every `n`-th epoch (unit "epoch")."""

    def __init__(self, n: int, unit: str):
        validate.positive_int(f"every: {unit}s", n)
        self.n, self.unit = n, unit

    def fires(self, step: int, epoch_ended: int | None) -> bool:
        """step: the optimizer steps so far; epoch_ended: the epoch (from 1) this step ended, or None."""
        if self.unit == "step":
            return step % self.n == 0
        return epoch_ended is not None and epoch_ended % self.n == 0


def every(steps: int | None = None, epochs: int | None = None) -> Trigger:
    """A trigger: every(steps=100) or every(epochs=1)."""
    if (steps is None) == (epochs is None):
        raise ValueError("every: give exactly one of steps or epochs")
    return Trigger(steps, "step") if steps is not None else Trigger(epochs, "epoch")


class Callback:
    """Every hook, doing nothing: override the ones you need."""

    trigger: Trigger | None = None  # None: on_step and on_batch_end after every step

    def on_train_begin(self) -> None:
        pass

    def on_epoch_begin(self, epoch: int) -> None:
        pass

    def on_step(self, step: int, loss) -> None:
        pass

    def on_batch_end(self, step: int, loss) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def on_evaluation(self, record: dict) -> bool | None:
        return None

    def on_train_end(self) -> None:
        pass


class EarlyStopping(Callback):
    """Stop after `patience` evaluations without a lower `monitor` (default: val_loss when the run
    has validation data, else train_loss); fit's early_stopping=patience is this callback."""

    def __init__(self, patience: int, monitor: str | None = None):
        validate.positive_int("EarlyStopping: patience", patience)
        self.patience, self.monitor = patience, monitor
        self.best, self.stale = math.inf, 0

    def on_evaluation(self, record: dict) -> bool:
        key = self.monitor or ("val_loss" if record.get("val_loss") is not None else "train_loss")
        if key == "train_loss" and key in record and record[key] is None and record.get("skipped_steps"):
            self.stale += 1  # (fp16: every step since the last evaluation overflowed and was skipped: no loss)
            return self.stale >= self.patience
        if key not in record or record[key] is None:
            raise ValueError(f"EarlyStopping: the evaluation record has no {key!r} to monitor "
                             f"(it has {', '.join(k for k, v in record.items() if v is not None)})")
        if record[key] < self.best:
            self.best, self.stale = record[key], 0
        else:
            self.stale += 1
        return self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.stale = int(state.get("stale", 0))


class TensorBoard(Callback):
    """Each evaluation's numbers (train_loss, val_loss, val_accuracy, lr, ...) as TensorBoard scalars
    at its step, in event files under log_dir (through tensorboardX: pip install 'gpunet[tensorboard]')."""

    SKIPPED = ("step", "epoch", "seconds")

    def __init__(self, log_dir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("gn.callbacks.TensorBoard writes through tensorboardX, which is not installed: "
                              "pip install 'gpunet[tensorboard]'") from None
        self.log_dir, self._writer_type, self.writer = log_dir, SummaryWriter, None

    def on_evaluation(self, record: dict) -> None:
        if self.writer is None:  # made at the first evaluation: a run refused before it leaves no file
            self.writer = self._writer_type(str(self.log_dir))
        for key, value in record.items():
            if key not in self.SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def on_train_end(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def check(callbacks) -> list:
    """fit's callbacks argument as a list, each item refused unless it has a hook."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"fit: callbacks must be a list of callbacks, got {type(callbacks).__name__}")
    for i, callback in enumerate(callbacks):
        if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
            raise TypeError(f"fit: callbacks[{i}] ({type(callback).__name__}) has neither on_step nor on_evaluation "
                            f"(nor another hook: {', '.join(HOOKS)})")
    return list(callbacks)


class Events:
    """The callbacks of one run, built-in and the user's, in the order their hooks are called."""

    def __init__(self, callbacks: list):
        self.callbacks = callbacks

    def fire(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(*args)

    STEP_HOOKS = ("on_step", "on_batch_end")

    def step(self, step: int, loss, epoch_ended: int | None, hooks: tuple = STEP_HOOKS) -> None:
        """on_step, then on_batch_end, of each callback whose trigger fires (all without one). hooks: which
        of the two (with accumulation on_batch_end fires after each batch and on_step after the step)."""
        for hook in hooks:
            for callback in self.callbacks:
                method, trigger = getattr(callback, hook, None), getattr(callback, "trigger", None)
                if method is not None and (trigger is None or trigger.fires(step, epoch_ended)):
                    method(step, loss)

    def evaluation(self, record: dict) -> bool:
        """Call every on_evaluation (all of them, even after one asked to stop); True: stop training."""
        stop = False
        for callback in self.callbacks:
            method = getattr(callback, "on_evaluation", None)
            if method is not None and method(record):
                stop = True
        return stop

    def state_dicts(self) -> list:
        """[{"class": name, "state": dict}, or None for a callback without state], by position."""
        return [{"class": type(c).__name__, "state": c.state_dict()} if callable(getattr(c, "state_dict", None))
                else None for c in self.callbacks]

    def load_state_dicts(self, saved: list, log=print) -> None:
        """Give each stateful callback the state saved at its position when the class matches; one that
        cannot be restored (none saved there, or another class's) starts afresh, said in one line."""
        for i, callback in enumerate(self.callbacks):
            if not callable(getattr(callback, "load_state_dict", None)):
                continue
            entry = saved[i] if i < len(saved) else None
            name = type(callback).__name__
            if entry is None or entry.get("class") != name:
                found = "nothing" if entry is None else f"the state of a {entry.get('class')}"
                log(f"resume: callback {i} ({name}) starts afresh: the run saved {found} at its position")
                continue
            callback.load_state_dict(entry["state"])
