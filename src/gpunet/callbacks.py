"""Hooks into fit: `fit(..., callbacks=[...])` calls each callback's on_step after every optimizer
step and on_evaluation after every evaluation; an on_evaluation that returns True stops training
(after that evaluation's checkpoints are written, as early_stopping does).

A callback is any object with either method (derive from Callback to get both as no-ops):

    class PrintLoss(gn.callbacks.Callback):
        def on_evaluation(self, record):
            print(record["step"], record["val_loss"])

on_step(step, loss): `step` counts optimizer steps from 1; `loss` is that step's mean training loss,
a 0-d array on the model's device (float(loss) reads it, and on a GPU makes the host wait for the step).
on_evaluation(record): the record just appended to the history (the same dict as history.json's).
A callback keeps its own state: a resumed run (resume=True) starts it afresh.
"""
from __future__ import annotations

import math

from gpunet import validate

__all__ = ["Callback", "EarlyStopping"]


class Callback:
    """Both hooks, doing nothing: override the ones you need."""

    def on_step(self, step: int, loss) -> None:
        pass

    def on_evaluation(self, record: dict) -> bool | None:
        return None


class EarlyStopping(Callback):
    """Stop after `patience` evaluations without a lower `monitor` (default: val_loss when the run
    has validation data, else train_loss), as fit's early_stopping=patience does."""

    def __init__(self, patience: int, monitor: str | None = None):
        validate.positive_int("EarlyStopping: patience", patience)
        self.patience, self.monitor = patience, monitor
        self.best, self.stale = math.inf, 0

    def on_evaluation(self, record: dict) -> bool:
        key = self.monitor or ("val_loss" if record.get("val_loss") is not None else "train_loss")
        if key not in record or record[key] is None:
            raise ValueError(f"EarlyStopping: the evaluation record has no {key!r} to monitor "
                             f"(it has {', '.join(k for k, v in record.items() if v is not None)})")
        if record[key] < self.best:
            self.best, self.stale = record[key], 0
        else:
            self.stale += 1
        return self.stale >= self.patience


def check(callbacks) -> list:
    """fit's callbacks argument as a list, each item refused unless it has a hook."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"fit: callbacks must be a list of callbacks, got {type(callbacks).__name__}")
    for i, callback in enumerate(callbacks):
        if not (callable(getattr(callback, "on_step", None)) or callable(getattr(callback, "on_evaluation", None))):
            raise TypeError(f"fit: callbacks[{i}] ({type(callback).__name__}) has neither on_step nor on_evaluation")
    return list(callbacks)


def step(callbacks, step: int, loss) -> None:
    for callback in callbacks:
        hook = getattr(callback, "on_step", None)
        if hook is not None:
            hook(step, loss)


def evaluation(callbacks, record: dict) -> bool:
    """Call every on_evaluation (all of them, even after one asked to stop); True: stop training."""
    stop = False
    for callback in callbacks:
        hook = getattr(callback, "on_evaluation", None)
        if hook is not None and hook(record):
            stop = True
    return stop
