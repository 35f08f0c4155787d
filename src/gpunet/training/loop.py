"""The training loop of fit: one _Run holds what it trains, its fixed settings, its RunSetup and the
LoopState that a resume restores; it steps, evaluates and reports divergence, and calls the hooks of its
callbacks around each step (the schedule, the divergence watch, progress, early stopping, checkpoints and
the history files are built-in callbacks: gpunet.training.builtin_callbacks; docs/training.md says which hook fires when).
"""
from __future__ import annotations

import math
from typing import Any
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from gpunet import random
from gpunet.training import accumulate as accumulating, checkpoint, loss_scale, resume as resuming
from gpunet.training.callbacks import Events
from gpunet.errors import out_of_memory
from gpunet.backend import ops_for_device, to_device
from gpunet.data.pipeline import apply_preprocess, minibatches
from gpunet.training.divergence import first_non_finite_tensor
from gpunet.training.history import History
from gpunet.losses import LOSSES, item, metric, report_keys, resolve
from gpunet.layers import inputs as arrays
from gpunet.training.resume import LoopState
from gpunet.training.setup import RunSetup
from gpunet.training.builtin_callbacks import DivergenceCheck


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite."""


class TrainingInterrupted(resuming.Interrupted):
    """Ctrl-C, SIGTERM or SIGHUP stopped training after a step; what a resume needs was saved first.
    signum: which signal (the command line exits with 128 + signum)."""


@dataclass
class _Run:
    """One call of fit: what it trains, its fixed settings and the LoopState that changes."""

    model: object
    data: object
    val: object
    optimizer: object
    schedule: object
    setup: RunSetup  # the device, the world, the run folder, resume and the seed, decided once
    loss: Any  # a name of gpunet.losses.LOSSES, or a list of them (one per output)
    batch_size: int
    epochs: int | None  # the run ends after this many epochs, or
    steps: int | None  # after this many optimizer steps
    eval_every: int | None  # None: at each epoch end
    clip_norm: float | None
    accumulate: int = 1  # batches per optimizer step (gpunet.training.accumulate); batch_size is one batch's
    config: dict = field(default_factory=dict)  # the hyper-parameters compared on resume
    state: LoopState = field(default_factory=LoopState)
    history: History = field(default_factory=History)
    written: list = field(default_factory=list)  # the files this run wrote
    callbacks: Events = field(default_factory=lambda: Events([]))  # built-in and the user's (training_callbacks.ordered)
    host_reads: bool = False  # whether the host reads this step's loss (every step on the CPU, every 25 on a GPU)
    host_loss: float | None = None  # the loss the host read last (DivergenceCheck reads it, once per read step)
    step_lr: float | None = None  # the learning rate of the last step taken (the schedule moved on after it)
    graph: object = None  # a gpunet.training.cuda_graph.GraphedStep when the step is replayed as a CUDA graph
    accumulator: object = None  # the gradient sums of a step (gpunet.training.accumulate), with accumulate > 1
    interrupted: object = None  # the StopRequest of stop_on_interrupt while training
    loss_weights: list | None = None  # with a list of losses: their weights (gpunet.losses.Combined)
    precision: str = "fp32"  # the steps' and evaluations' (gpunet.backend.precision), decided when the run starts
    scaler: object = None  # fp16's loss scaler (gpunet.training.loss_scale.LossScaler); None in fp32 and bf16

    def __post_init__(self) -> None:
        self.loss_fn = resolve(self.loss, self.loss_weights)

    @property
    def out(self) -> Path | None:
        """The run folder this process writes (rank 0's; None elsewhere, and without one)."""
        return self.setup.out if self.setup.writes else None

    @property
    def parallel(self):
        return self.setup.world

    @property
    def seed(self) -> int:
        return self.setup.seed

    @property
    def monitor(self) -> str:
        """The record entry that decides the best model and early stopping."""
        return "val_loss" if self.val is not None else "train_loss"

    def done(self) -> bool:
        """Whether the steps, or the epochs, asked for are done. Epochs are counted, not derived from the
        step: a resume with a new batch size changes how many steps an epoch takes."""
        s = self.state
        if self.epochs is None:
            return s.step >= self.steps
        return s.epoch + (s.sample >= len(self.data)) >= self.epochs

    @property
    def step_size(self) -> int:
        """The samples of a full optimizer step: accumulate batches of batch_size."""
        return self.batch_size * self.accumulate

    def length(self) -> str:
        return f"{self.steps} steps" if self.epochs is None else f"{self.epochs} epochs"

    def planned_steps(self) -> int:
        """The step the run will end at (for the progress bar), at the current batch size."""
        s, n = self.state, len(self.data)
        if self.epochs is None or self.done():
            return max(s.step, self.steps or 0)
        rest_of_this_epoch = math.ceil(max(0, n - s.sample) / self.step_size)
        return s.step + rest_of_this_epoch + (self.epochs - s.epoch - 1) * math.ceil(n / self.step_size)

    def _evaluation_due(self) -> bool:
        """Every eval_every steps, or at each epoch end; and at the end of the run."""
        s = self.state
        due = s.sample >= len(self.data) if self.eval_every is None else s.step % self.eval_every == 0
        return due or self.done()

    def train(self, interrupted) -> None:
        """Steps until done, a callback's stop (early stopping), divergence (raises) or Ctrl-C (saves, raises),
        calling the callbacks' hooks around each step (docs/training.md). On a GPU the host reads the loss and
        the divergence watch only every 25 steps, before each evaluation (the last included) and on Ctrl-C:
        never inside a step, and the report still names the first bad step."""
        s, events = self.state, self.callbacks
        self.interrupted = interrupted  # (an accumulated step looks at it between its batches)
        check_every = 25 if self.setup.on_gpu else 1  # reading a loss makes the host wait for the GPU
        self.model.train()
        self.parallel.start(self.model, self.seed)  # rank 0's weights on every rank; per-rank dropout streams
        started, batches = time.perf_counter(), self._batches()
        events.fire("on_train_begin")
        stop = self.done()
        while not stop:
            idx = next(batches)
            if s.batch == 0:
                events.fire("on_epoch_begin", s.epoch + 1)
            value = self._step(idx)
            evaluate = self._evaluation_due()
            self.host_reads = evaluate or s.step % check_every == 0
            ended = s.epoch + 1 if s.sample >= len(self.data) else None
            events.step(s.step, value, ended, hooks=("on_step",) if self.accumulate > 1 else Events.STEP_HOOKS)
            if ended is not None:
                events.fire("on_epoch_end", ended)
            if evaluate:
                stop = events.evaluation(self._evaluation(started)) or self.done()
            # Ctrl-C: save what a resume needs after this step, then stop (with several ranks: all at the same step,
            # agreed at evaluations and every 25 steps)
            if not stop and self.parallel.any(interrupted.is_set(), now=evaluate or s.step % 25 == 0):
                self._interrupt(interrupted.signum)
        events.fire("on_train_end")

    def _batches(self):
        """The indices of each step's samples from the saved position on, epoch after epoch (with
        accumulation the group of accumulate batches). The order of epoch e is seeded by (seed, e), so it
        is the same after a resume."""
        s = self.state
        while True:
            order = numpy.random.default_rng([self.seed, s.epoch])
            yield from minibatches(len(self.data), self.step_size, order, start=s.batch, offset=s.sample)
            s.epoch, s.batch, s.sample = s.epoch + 1, 0, 0

    def _step(self, idx):
        """One optimizer step on the samples idx; returns the loss (a device scalar on a GPU)."""
        if self.accumulate > 1:
            return accumulating.step(self, idx)
        s, model = self.state, self.model
        everyone, idx = idx, self.parallel.share(idx)  # this rank's share of the global batch
        random.set_step(s.step)  # dropout masks: a function of (seed, step, layer, element), so a resume redraws them
        # gathering the batch allocates too: out of memory there is named as in the step
        with out_of_memory(model.device, f"in step {s.step + 1}", len(idx), "--batch-size, or batch_size= of gn.fit"):
            xb, yb = self.data.get(idx, numpy.random.default_rng(self.parallel.stream(self.seed, s.epoch, s.batch)))
            if self.graph is not None and self.graph.active:  # replayed (after its first step on a batch shape)
                value = self.graph.run(xb, yb)
            else:
                value = self._device_step(*(arrays.each(lambda a: to_device(a, model.device), b) if len(idx) else None
                                            for b in (xb, yb)),
                                          len(idx), len(everyone))
        self.add_running(value)
        s.step, s.batch, s.sample = s.step + 1, s.batch + 1, s.sample + len(everyone)
        return value

    def add_running(self, value) -> None:
        """The step's loss into the running train loss (with a loss scaler the divergence watch sums the finite
        losses it reads on the host instead: a step skipped for an overflow may have an inf loss)."""
        if self.scaler is None:
            self.state.running, self.state.running_count = self.state.running + value, self.state.running_count + 1

    def _device_step(self, xb, yb, count: int | None = None, total: int | None = None):
        """Forward, loss, backward, the gradients combined across ranks, clipping and the optimizer
        on a batch already on the device (raw: preprocessed here); returns the loss. All of it
        device work, so a CUDA graph can capture it (count and total: this rank's samples and the
        global batch's, for the all-reduce; None: the batch's own)."""
        model = self.model
        value = None
        if count is None or count:  # (a batch smaller than the world leaves a rank no sample)
            x = apply_preprocess(model.preprocess, xb, _xp(model))
            value, grad = self.loss_fn(model.forward(x), yb)
            # parameter gradients (nobody reads the input gradient), in fp16 of the loss times the scale
            model.backward_params(grad if self.scaler is None else self.scaler.scale(grad))
        if count is not None:
            value = self.parallel.combine(model, value, count, total)  # one all-reduce of the gradients
        loss_scale.update_step(self)  # (unscaled and checked in fp16), clipped, the optimizer's step
        return value

    def _micro_step(self, xb, yb, weight):
        """With accumulation: forward, loss and backward of one batch, its loss gradient scaled by weight (its
        share of the step's samples: a float, or a device scalar in a CUDA graph) and its parameter gradients
        added into the step's sums; returns the batch's mean loss. All of it device work, as _device_step."""
        model = self.model
        x = apply_preprocess(model.preprocess, xb, _xp(model))
        value, grad = self.loss_fn(model.forward(x), yb)
        grad = accumulating.scaled(grad, weight)
        model.backward_params(grad if self.scaler is None else self.scaler.scale(grad))  # (the step's scale: fixed)
        self.accumulator.add()
        return value

    def _update_step(self, loss=None, count: int | None = None, total: int | None = None):
        """With accumulation: the summed gradients into the gradient buffers, combined across ranks (once a
        step; count and total: this rank's samples of the step and the step's), clipped, and the optimizer's
        update; returns loss (this rank's share of the step's mean loss), combined across ranks."""
        self.accumulator.gradients()
        if count is not None:
            loss = self.parallel.combine(self.model, loss, count, total, weighted=True)
        loss_scale.update_step(self)
        return loss

    def _evaluation(self, started) -> dict:
        """The record of an evaluation at this step, added to the history (raises if not finite)."""
        s = self.state
        record = {"step": s.step, "epoch": s.epoch + 1,  # (train_loss None: fp16 overflowed every step since the last)
                  "train_loss": item(s.running) / s.running_count if s.running_count else None,
                  "val_loss": None, "lr": self.step_lr, "seconds": round(time.perf_counter() - started, 3),
                  "world_size": self.parallel.world_size, **(self.scaler.record() if self.scaler else {})}
        if self.val is not None:
            result = (self.parallel.evaluate(self._validate, self.model, *self.val, self.loss)  # (sums over the ranks)
                      if isinstance(self.val, tuple) else self.val.evaluate(self.model, self.loss))
            record["val_loss"] = result["loss"]
            for key in report_keys(self.loss)[1:]:  # val_accuracy; with several outputs val_loss_0, val_accuracy_0, ...
                if key in result:
                    record[f"val_{key}"] = result[key]
        s.running, s.running_count = 0.0, 0
        self.history.append(record)
        self._check_evaluation(record)
        return record

    def _validate(self, model, x, y, loss, batch_size) -> dict:
        """_evaluate of the validation arrays, in batches of the training's batch_size (as Keras's
        validation_batch_size defaults to it: a convolution's columns at 1,000 images take hundreds of MB, whose
        fresh pages cost a CPU three times the arithmetic); out of memory names this evaluation and how to
        validate in smaller batches."""
        return _evaluate(model, x, y, loss, batch_size or self.batch_size, self.loss_weights,
                         doing=f"validating after step {self.state.step}",
                         option="fit validates in batches of its batch_size; pass val as an object whose "
                                "evaluate(model, loss) returns gn.evaluate(model, x, y, loss, batch_size=...)")

    def save_last(self) -> None:
        """last.safetensors at this step: what a resume needs, the callbacks' states included (only ever with
        finite weights)."""
        self.state.last_step, self.state.callbacks = self.state.step, self.callbacks.state_dicts()
        resuming.save_last(self.out, self.model, self.optimizer, self.schedule, state=self.state,
                           history=self.history, config=self.config,  # (the scaler's state_dict syncs step_count)
                           loss_scale=self.scaler.state_dict() if self.scaler is not None else None)
        self.written.append(self.out / "last.safetensors")

    def restore_callbacks(self, log) -> None:
        """The callbacks' states saved with the run (gpunet.training.callbacks.Events.load_state_dicts). A run saved
        before callbacks kept state counted early stopping in its LoopState: fit's early_stopping goes on from it."""
        saved = self.state.callbacks
        if saved is None:
            saved = [{"class": "EarlyStopping", "state": {"best": self.state.best_loss, "stale": self.state.stale}}
                     if getattr(c, "of_fit", False) else None for c in self.callbacks.callbacks]
        self.callbacks.load_state_dicts(saved, log)

    def finish(self, restore_best: bool) -> History:
        """The history with the best step and the files written; the best model loaded back (with validation
        data only: the lowest train loss says nothing about data the model has not seen, so then the last
        weights stay)."""
        history = self.history
        history.best_step, history.written = self.state.best_step, self.written
        self.restore_best(self.out, restore_best)
        return history

    def restore_best(self, out, restore_best: bool = True) -> None:
        """Load out/model.safetensors, the best model, when restore_best asks and validation chose it."""
        if restore_best and out is not None and self.val is not None and self.history.best_step is not None \
                and (out / "model.safetensors").exists():
            self.model.load_state_dict(checkpoint.read_checkpoint(out / "model.safetensors")[0])

    def check_finite(self, watch) -> None:
        """Raise TrainingDiverged at the first step whose loss was not finite (exact on every device)."""
        bad = watch.first_bad()
        if bad is not None:
            step, value = bad
            self.history.append({"step": step, "epoch": self.state.epoch + 1, "train_loss": value, "val_loss": None,
                                 "diverged": True})
            self._diverged(f"loss became {value} at step {step}")

    def _check_evaluation(self, record) -> None:
        """Raise TrainingDiverged when an evaluation or the weights are not finite: nothing is saved then."""
        losses = [k for k in ("train_loss", "val_loss") if record.get(k) is not None and not math.isfinite(record[k])]
        tensor = None if losses else first_non_finite_tensor(self.model)
        if losses or tensor is not None:
            record["diverged"] = True
            what = (f"{losses[-1].replace('_', ' ').replace('val', 'validation')} became {record[losses[-1]]}"
                    if losses else f"weight {tensor!r} became NaN or infinite")
            self._diverged(f"{what} at step {record['step']}")

    def _diverged(self, what: str) -> None:
        """Write the history (with the diverged record) and raise, naming the last finite checkpoint."""
        where = ""
        if self.out is not None:
            last = self.out / "last.safetensors"
            if self.state.last_step is not None:
                where = f"; last good checkpoint: {last} (step {self.state.last_step})"
            elif last.exists():
                where = f"; last good checkpoint: {last} (of an earlier run in this folder, not this one)"
            else:
                where = "; no checkpoint was saved (it diverged before its first evaluation)"
            self.history.write(self.out)  # the diverged record, its non-finite values as null
        raise TrainingDiverged(f"{what} (epoch {self.state.epoch + 1}); training stopped{where}. "
                               "Try a lower learning rate (--lr) or gradient clipping (--clip-norm).")

    def _interrupt(self, signum, dropped: str = "") -> None:
        """Save last.safetensors at this step (with the running train loss, so a resume is exact); a loss
        that was not finite since the last check ends the run as a divergence instead, as on the CPU.
        dropped: what the message says of an accumulated step's batches dropped."""
        next(c for c in self.callbacks.callbacks if isinstance(c, DivergenceCheck)).check()
        where = f"{resuming.interrupted_by(signum)} at step {self.state.step}{dropped}"
        if first_non_finite_tensor(self.model) is not None:
            raise TrainingInterrupted(f"{where}; the weights are not finite, so nothing was saved", signum)
        if self.out is None:  # a data-parallel rank other than 0: rank 0 saves for all
            raise TrainingInterrupted(where, signum)
        self.save_last()
        self.history.write(self.out)
        raise TrainingInterrupted(f"{where}; saved "
                                  f"{self.out / 'last.safetensors'}: run the same command with --resume to continue",
                                  signum)


def _xp(model):
    return ops_for_device(model.device).xp


def _evaluate(model, x, y, loss, batch_size, loss_weights=None, doing: str = "evaluating",
              option: str = "--batch-size, or batch_size= of gn.evaluate") -> dict:
    """evaluate without its input checks: fit checks its validation data once, not at every evaluation.
    doing and option: how an out-of-memory error names this evaluation and its batch size. With several
    outputs (a list of losses): the weighted total "loss", and per output i "loss_i" and "accuracy_i"."""
    names = list(loss) if isinstance(loss, (list, tuple)) else [loss]
    targets, n = (y if isinstance(loss, (list, tuple)) else [y]), arrays.samples(x)
    if batch_size is None:
        batch_size = max(1, min(1000, 32768 // max(1, int(numpy.prod(targets[0].shape[1:])))))
    was_training = model.training
    model.eval()
    try:
        with out_of_memory(model.device, doing, min(batch_size, n), option):
            totals, correct = _evaluate_batches(model, x, targets, names, batch_size)
    finally:
        model.train(was_training)
    means = [item(total) / n for total in totals]
    accuracy = [int(c) / (n * (t[0].size if t.ndim > 1 else 1)) if metric(name) == "accuracy" else None
                for c, t, name in zip(correct, targets, names)]
    if not isinstance(loss, (list, tuple)):
        return {"loss": means[0], "samples": int(n), **({"accuracy": accuracy[0]} if accuracy[0] is not None else {})}
    weights = resolve(loss, loss_weights, "evaluate").weights
    result = {"loss": sum(w * m for w, m in zip(weights, means)), "samples": int(n)}
    for i, (mean, share) in enumerate(zip(means, accuracy)):
        result[f"loss_{i}"] = mean
        if share is not None:
            result[f"accuracy_{i}"] = share
    return result


def _evaluate_batches(model, x, targets, names, batch_size):
    """Each output's loss summed over every sample, and the correct predictions of each classifier output,
    on the device (the host reads each once, after the last batch)."""
    totals, correct = [0.0] * len(names), [0] * len(names)
    for idx in minibatches(arrays.samples(x), batch_size, None):
        xb = apply_preprocess(model.preprocess, arrays.each(lambda a: to_device(a, model.device), arrays.take(x, idx)),
                              _xp(model))
        outputs = model.forward(xb)
        for i, (out, name, y) in enumerate(zip(outputs if len(names) > 1 else [outputs], names, targets)):
            yb = to_device(y[idx], model.device)
            value, _ = LOSSES[name](out, yb)
            totals[i] = totals[i] + value.astype("float64") * len(idx)  # float64, as the host sum was
            if metric(name) == "accuracy":
                correct[i] = correct[i] + (out.argmax(axis=-1) == yb).sum()
    return totals, correct
