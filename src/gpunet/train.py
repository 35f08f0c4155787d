"""The fit loop: mini-batches, evaluation, history, checkpoints, early stopping, exact resume.

Randomness is derived, not carried: the order of epoch e comes from seed (seed, e) and the
augmentation of batch b from (seed, e, b), so a resumed run needs only the position and the
dropout generator's state to continue exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy
from tqdm.auto import tqdm

from gpunet import checkpoint, random, resume as resuming, validate
from gpunet.backend import ops_for_device, to_device
from gpunet.data.pipeline import apply_preprocess, minibatches, random_shift
from gpunet.divergence import DivergenceWatch, first_non_finite_tensor
from gpunet.history import History
from gpunet.losses import LOSSES, item
from gpunet.optim import clip_grad_norm
from gpunet.resume import LoopState
from gpunet.runs import FIT_OPTIONS, open_run


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after a step; what a resume needs was saved first."""


class DeviceOutOfMemory(MemoryError):
    """The GPU ran out of memory during training."""


class ArrayData:
    """In-memory (x, y) training data with optional random image shifts."""

    def __init__(self, x, y, shift: int = 0):
        if len(x) != len(y):
            raise ValueError(f"training data: {len(x)} inputs but {len(y)} labels")
        validate.finite_array(x, "training data")
        validate.finite_array(y, "training data", "targets")
        self.x, self.y, self.shift = x, y, shift

    def __len__(self) -> int:
        return len(self.x)

    def get(self, indices, rng):
        x = self.x[indices]
        if self.shift:
            x = random_shift(x, self.shift, rng)
        return x, self.y[indices]


def evaluate(model, x, y, loss="softmax_cross_entropy", batch_size: int | None = None) -> dict:
    """Mean loss (and accuracy for classification) over raw inputs x and targets y.

    batch_size defaults to 1000 samples, or fewer for sequences (32,768 targets a batch).
    """
    if len(x) != len(y):
        raise ValueError(f"evaluate: {len(x)} inputs but {len(y)} targets")
    validate.not_empty(len(x), "evaluate")
    validate.positive_int("evaluate: batch_size", batch_size, allow_none=True)
    if isinstance(x, numpy.ndarray):
        validate.images(x, model.preprocess, "evaluate: images")
    return _evaluate(model, x, y, loss, batch_size)


def _evaluate(model, x, y, loss, batch_size) -> dict:
    """evaluate without its input checks: fit checks its validation data once, not at every evaluation."""
    loss_fn = LOSSES[loss]
    if batch_size is None:
        batch_size = max(1, min(1000, 32768 // max(1, int(numpy.prod(y.shape[1:])))))
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0  # summed on the device: the host reads each once, after the last batch
    try:
        for idx in minibatches(len(x), batch_size, None):
            xb = apply_preprocess(model.preprocess, to_device(x[idx], model.device), _xp(model))
            yb = to_device(y[idx], model.device)
            out = model.forward(xb)
            value, _ = loss_fn(out, yb)
            total = total + value.astype("float64") * len(idx)  # float64, as the host sum was
            if loss == "softmax_cross_entropy":
                correct = correct + (out.argmax(axis=-1) == yb).sum()
    finally:
        model.train(was_training)
    result = {"loss": item(total) / len(x), "samples": int(len(x))}
    if loss == "softmax_cross_entropy":
        result["accuracy"] = int(correct) / (len(x) * (y[0].size if y.ndim > 1 else 1))
    return result


def fit(model, train, val=None, *, optimizer, loss: str = "softmax_cross_entropy", epochs: int | None = None,
        steps: int | None = None, batch_size: int = 128, eval_every: int | None = None, schedule=None,
        clip_norm: float | None = None, early_stopping: int | None = None, out_dir=None, resume: bool = False,
        seed: int = 0, progress: bool | None = None, restore_best: bool = True, run_config: dict | None = None,
        log=print, overwrite: bool = False) -> History:
    """Train model in place and return its History.

    train: (x, y) raw arrays (the model's preprocess is applied per batch) or an object with
    __len__ and get(indices, rng). val: (x, y) raw arrays, or an object with evaluate(model, loss)
    returning {"loss": ..., ["accuracy": ...]}. Stops after `epochs` (counted in samples served, so a
    resume with another batch size still ends at the last epoch's end) or after `steps` optimizer
    steps; evaluates at each epoch end, or every `eval_every` steps, and at the end. schedule.step() is called
    after each evaluation. The monitored loss is val_loss, or train_loss (the mean since the
    previous evaluation) without val; early_stopping: evaluations without a lower one before stopping.
    With out_dir: history.json, metrics.csv, history.png, model.safetensors (the model of the lowest
    monitored loss) and last.safetensors (everything needed to resume). An out_dir that already holds
    a run is refused (RunExists) unless resume=True continues it or overwrite=True moves it into
    out_dir/replaced-DATE-TIME (deleting nothing). The folder is locked while training (a second run
    into it fails at once) and temporaries of a dead run are removed.
    A non-finite loss or weight raises TrainingDiverged naming the step; nothing non-finite is
    saved. Ctrl-C saves last.safetensors after the current step and raises TrainingInterrupted.
    resume: the hyper-parameters are compared with the saved run's (see gpunet.resume); run_config
    adds the caller's own (model, dataset, ...) to that comparison; log prints what is applied.
    restore_best: with val and out_dir, the model ends with the weights of model.safetensors.
    The History returned has .best_step (of the saved model, or None) and .written (the files).
    """
    _check_arguments(loss, epochs, steps, batch_size, eval_every, early_stopping, seed, clip_norm)
    if resume and overwrite:
        raise ValueError("fit: resume=True continues the run in out_dir and overwrite=True moves it aside; give one "
                         "of them")
    if resume and out_dir is None:
        raise ValueError("fit: resume=True needs out_dir, the folder of the run to continue")
    data = ArrayData(*train) if isinstance(train, tuple) else train
    _check_data(model, data, val)
    out = Path(out_dir) if out_dir is not None else None
    run = _Run(model, data, val, optimizer, schedule, loss=loss, batch_size=batch_size, seed=seed, epochs=epochs,
               steps=steps, eval_every=eval_every, clip_norm=clip_norm, patience=early_stopping, out=out)
    # out_dir: checked as `gpunet train` checks --out (a run there is refused unless resumed or moved aside),
    # locked (re-entrant: `gpunet train` holds it already), a dead run's temporaries removed
    folder = open_run(out, resume, overwrite, log, FIT_OPTIONS) if out is not None else contextlib.nullcontext()
    with folder, resuming.stop_on_interrupt(out is not None) as interrupted:
        run.config = resuming.run_config(model, optimizer, schedule, loss=loss, seed=seed, batch_size=batch_size,
                                         clip_norm=clip_norm, eval_every=eval_every,  # as given: None, epoch ends
                                         early_stopping=early_stopping, extra=run_config)
        if resume:
            run.history, run.state = resuming.restore(out, model, optimizer, schedule, config=run.config, log=log,
                                                      samples=len(data))
            if run.done():
                log(f"resume: the run is already at step {run.state.step}, which reaches the {run.length()} asked "
                    "for; nothing to train (ask for more steps or epochs)")
        run.train(progress, interrupted)
        return run.finish(restore_best)


def _check_arguments(loss, epochs, steps, batch_size, eval_every, early_stopping, seed, clip_norm) -> None:
    """Refuse bad settings before any work, naming the argument."""
    if (epochs is None) == (steps is None):
        raise ValueError("fit: give exactly one of epochs or steps")
    validate.positive_int("fit: epochs", epochs, allow_none=True)
    validate.positive_int("fit: steps", steps, allow_none=True)
    validate.positive_int("fit: batch_size", batch_size)
    validate.positive_int("fit: eval_every", eval_every, allow_none=True)
    validate.positive_int("fit: early_stopping", early_stopping, allow_none=True)
    validate.seed("fit: seed", seed)
    if clip_norm is not None:
        validate.finite("fit: clip_norm", clip_norm, low=0)
    if loss not in LOSSES:
        raise ValueError(f"fit: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def _check_data(model, data, val) -> None:
    """Refuse empty sets, NaN/Inf and images outside the model's pixel range before any work."""
    validate.not_empty(len(data), "training data")
    if isinstance(data, ArrayData):
        validate.images(data.x, model.preprocess, "training data")
    if isinstance(val, tuple):
        x, y = val
        if len(x) != len(y):
            raise ValueError(f"validation data: {len(x)} inputs but {len(y)} targets")
        validate.not_empty(len(x), "validation data")
        validate.finite_array(x, "validation data")
        validate.finite_array(y, "validation data", "targets")
        validate.images(x, model.preprocess, "validation data")


@dataclass
class _Run:
    """One call of fit: what it trains, its fixed settings and the LoopState that changes."""

    model: object
    data: object
    val: object
    optimizer: object
    schedule: object
    loss: str
    batch_size: int
    seed: int
    epochs: int | None  # the run ends after this many epochs, or
    steps: int | None  # after this many optimizer steps
    eval_every: int | None  # None: at each epoch end
    clip_norm: float | None
    patience: int | None  # early stopping
    out: Path | None
    config: dict = field(default_factory=dict)  # the hyper-parameters compared on resume
    state: LoopState = field(default_factory=LoopState)
    history: History = field(default_factory=History)
    written: list = field(default_factory=list)  # the files this run wrote

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

    def length(self) -> str:
        return f"{self.steps} steps" if self.epochs is None else f"{self.epochs} epochs"

    def _planned_steps(self) -> int:
        """The step the run will end at (for the progress bar), at the current batch size."""
        s, n = self.state, len(self.data)
        if self.epochs is None or self.done():
            return max(s.step, self.steps or 0)
        rest_of_this_epoch = math.ceil(max(0, n - s.sample) / self.batch_size)
        return s.step + rest_of_this_epoch + (self.epochs - s.epoch - 1) * math.ceil(n / self.batch_size)

    def _evaluation_due(self) -> bool:
        """Every eval_every steps, or at each epoch end; and at the end of the run."""
        s = self.state
        due = s.sample >= len(self.data) if self.eval_every is None else s.step % self.eval_every == 0
        return due or self.done()

    def train(self, progress, interrupted) -> None:
        """Steps until done, early stopping, divergence (raises) or Ctrl-C (saves, raises). On a GPU the
        host reads the loss and the divergence watch only every 25 steps, before each evaluation (the
        last included) and on Ctrl-C: never inside a step, and the report still names the first bad step."""
        s = self.state
        check_every = 1 if self.model.device == "cpu" else 25  # reading a loss makes the host wait for the GPU
        xp = _xp(self.model)
        watch = DivergenceWatch(xp)
        self.model.train()
        bar = tqdm(total=self._planned_steps(), initial=s.step, disable=(None if progress is None else not progress),
                   unit="step", dynamic_ncols=True)
        started, batches = time.perf_counter(), self._batches()
        stop = self.done()
        while not stop:
            value = self._step(next(batches), xp)
            watch.observe(value, s.step)  # on a GPU a device-side record: no wait here
            bar.update(1)
            evaluate = self._evaluation_due()
            if evaluate or s.step % check_every == 0:
                current = item(value)  # the host waits for the step here: device-side errors raise too
                self._check_finite(watch)  # a bad step is named before an evaluation can see its weights
                bar.set_postfix(loss=f"{current:.4f}", refresh=False)
            if evaluate:
                stop = self._after_evaluation(self._evaluation(started)) or self.done()
            if interrupted.is_set() and not stop:  # Ctrl-C: save what a resume needs after this step, then stop
                self._interrupt(watch)
        bar.close()

    def _batches(self):
        """Batch indices from the saved position on, epoch after epoch. The order of epoch e is
        seeded by (seed, e), so it is the same after a resume."""
        s = self.state
        while True:
            order = numpy.random.default_rng([self.seed, s.epoch])
            yield from minibatches(len(self.data), self.batch_size, order, start=s.batch, offset=s.sample)
            s.epoch, s.batch, s.sample = s.epoch + 1, 0, 0

    def _step(self, idx, xp):
        """One optimizer step on the samples idx; returns the loss (a device scalar on a GPU)."""
        s, model = self.state, self.model
        xb, yb = self.data.get(idx, numpy.random.default_rng([self.seed, s.epoch, s.batch]))
        random.set_step(s.step)  # dropout masks: a function of (seed, step, layer, element), so a resume redraws them
        try:
            xb = apply_preprocess(model.preprocess, to_device(xb, model.device), xp)
            value, grad = LOSSES[self.loss](model.forward(xb), to_device(yb, model.device))
            model.backward_params(grad)  # parameter gradients; nobody reads the input gradient
            if self.clip_norm:
                clip_grad_norm(model, self.clip_norm)
            self.optimizer.step()
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":  # cupy.cuda.memory.OutOfMemoryError
                raise DeviceOutOfMemory(f"the GPU ran out of memory in step {s.step + 1} with a batch of "
                                        f"{len(idx)} ({exc}); try a smaller batch size (--batch-size)") from exc
            raise
        s.running, s.running_count = s.running + value, s.running_count + 1
        s.step, s.batch, s.sample = s.step + 1, s.batch + 1, s.sample + len(idx)
        return value

    def _evaluation(self, started) -> dict:
        """The record of an evaluation at this step, added to the history (raises if not finite)."""
        s = self.state
        record = {"step": s.step, "epoch": s.epoch + 1, "train_loss": item(s.running) / s.running_count,
                  "val_loss": None, "lr": self.optimizer.lr, "seconds": round(time.perf_counter() - started, 3)}
        if self.val is not None:
            result = (_evaluate(self.model, *self.val, self.loss, None) if isinstance(self.val, tuple)
                      else self.val.evaluate(self.model, self.loss))
            record["val_loss"] = result["loss"]
            if "accuracy" in result:
                record["val_accuracy"] = result["accuracy"]
        s.running, s.running_count = 0.0, 0
        self.history.append(record)
        self._check_evaluation(record)
        return record

    def _after_evaluation(self, record) -> bool:
        """The schedule, the best and last checkpoints, early stopping; True: stop training."""
        s = self.state
        if self.schedule is not None:
            self.schedule.step()
        improved = record[self.monitor] < s.best_loss
        if improved:
            s.best_loss, s.stale, s.best_step = record[self.monitor], 0, s.step
        else:
            s.stale += 1
        if self.out is not None:
            if improved:
                checkpoint.save(self.model, self.out / "model.safetensors")
                self.written.append(self.out / "model.safetensors")
            self._save_last()
            self.history.write(self.out)
        return self.patience is not None and s.stale >= self.patience

    def _save_last(self) -> None:
        """last.safetensors at this step: what a resume needs (only ever with finite weights)."""
        self.state.last_step = self.state.step
        resuming.save_last(self.out, self.model, self.optimizer, self.schedule, state=self.state,
                           history=self.history, config=self.config)
        self.written.append(self.out / "last.safetensors")

    def finish(self, restore_best: bool) -> History:
        """Write the history files; load the best model back (with validation data only: the lowest
        train loss says nothing about data the model has not seen, so then the last weights stay)."""
        history, out = self.history, self.out
        history.best_step, history.written = self.state.best_step, self.written
        if out is not None:
            history.written += history.write(out)
            if len(history):
                history.plot(out / "history.png")
                history.written.append(out / "history.png")
        if restore_best and out is not None and self.val is not None and history.best_step is not None \
                and (out / "model.safetensors").exists():
            self.model.load_state_dict(checkpoint.read_checkpoint(out / "model.safetensors")[0])
        return history

    def _check_finite(self, watch) -> None:
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

    def _interrupt(self, watch) -> None:
        """Save last.safetensors at this step (with the running train loss, so a resume is exact); a loss
        that was not finite since the last check ends the run as a divergence instead, as on the CPU."""
        self._check_finite(watch)
        if first_non_finite_tensor(self.model) is not None:
            raise TrainingInterrupted(f"interrupted at step {self.state.step}; the weights are not finite, so "
                                      "nothing was saved")
        self._save_last()
        self.history.write(self.out)
        raise TrainingInterrupted(f"interrupted at step {self.state.step}; saved {self.out / 'last.safetensors'}: "
                                  "run the same command with --resume to continue")


def _xp(model):
    return ops_for_device(model.device).xp
