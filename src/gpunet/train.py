"""The fit loop: mini-batches, evaluation, history, checkpoints, early stopping, exact resume.

Randomness is derived, not carried: the order of epoch e comes from seed (seed, e) and the
augmentation of batch b from (seed, e, b), so a resumed run needs only the position and the
dropout generator's state to continue exactly where it stopped.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy
from tqdm.auto import tqdm

from gpunet import checkpoint, resume as resuming, validate
from gpunet.backend import ops_for_device, to_device
from gpunet.data.pipeline import apply_preprocess, minibatches, random_shift
from gpunet.divergence import DivergenceWatch, first_non_finite_tensor
from gpunet.files import clean_stale_tmp
from gpunet.history import History
from gpunet.losses import LOSSES, item
from gpunet.optim import clip_grad_norm
from gpunet.runs import RUN_FILES, RunLock


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
    loss_fn = LOSSES[loss]
    if len(x) != len(y):
        raise ValueError(f"evaluate: {len(x)} inputs but {len(y)} targets")
    validate.not_empty(len(x), "evaluate")
    validate.positive_int("evaluate: batch_size", batch_size, allow_none=True)
    if isinstance(x, numpy.ndarray):
        validate.images(x, model.preprocess, "evaluate: images")
    if batch_size is None:
        batch_size = max(1, min(1000, 32768 // max(1, int(numpy.prod(y.shape[1:])))))
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    try:
        for idx in minibatches(len(x), batch_size, None):
            xb = apply_preprocess(model.preprocess, to_device(x[idx], model.device), _xp(model))
            yb = to_device(y[idx], model.device)
            out = model.forward(xb)
            value, _ = loss_fn(out, yb)
            total += item(value) * len(idx)
            if loss == "softmax_cross_entropy":
                correct += int((out.argmax(axis=-1) == yb).sum())
    finally:
        model.train(was_training)
    result = {"loss": total / len(x), "samples": int(len(x))}
    if loss == "softmax_cross_entropy":
        result["accuracy"] = correct / (len(x) * (y[0].size if y.ndim > 1 else 1))
    return result


def fit(model, train, val=None, *, optimizer, loss: str = "softmax_cross_entropy", epochs: int | None = None,
        steps: int | None = None, batch_size: int = 128, eval_every: int | None = None, schedule=None,
        clip_norm: float | None = None, early_stopping: int | None = None, out_dir=None, resume: bool = False,
        seed: int = 0, progress: bool | None = None, restore_best: bool = True, run_config: dict | None = None,
        log=print) -> History:
    """Train model in place and return its History.

    train/val: (x, y) raw arrays (the model's preprocess is applied per batch) or an object with
    __len__ and get(indices, rng). Stops after `epochs` or after `steps` optimizer steps; evaluates
    at each epoch end, or every `eval_every` steps. schedule.step() is called after each
    evaluation. early_stopping: evaluations without a better val_loss before stopping.
    With out_dir: history.json, metrics.csv, history.png, model.safetensors (the best model by
    val_loss) and last.safetensors (everything needed to resume). The folder is locked while
    training (a second run into it fails at once) and temporaries of a dead run are removed.
    A non-finite loss or weight raises TrainingDiverged naming the step; nothing non-finite is
    saved. Ctrl-C saves last.safetensors after the current step and raises TrainingInterrupted.
    resume: the hyper-parameters are compared with the saved run's (see gpunet.resume); run_config
    adds the caller's own (model, dataset, ...) to that comparison; log prints what is applied.
    The History returned has .best_step (of the saved model, or None) and .written (the files).
    """
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
    data = ArrayData(*train) if isinstance(train, tuple) else train
    _check_data(model, data, val)
    out = Path(out_dir) if out_dir is not None else None
    lock = RunLock(out).acquire() if out is not None else None
    try:
        if out is not None:
            clean_stale_tmp(out, RUN_FILES)
        with resuming.stop_on_interrupt(out is not None) as interrupted:
            return _fit(model, data, val, optimizer, loss, epochs, steps, batch_size, eval_every, schedule, clip_norm,
                        early_stopping, out, resume, seed, progress, restore_best, run_config, log, interrupted)
    finally:
        if lock is not None:
            lock.release()


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


def _fit(model, data, val, optimizer, loss, epochs, steps, batch_size, eval_every, schedule, clip_norm,
         early_stopping, out, resume, seed, progress, restore_best, run_config, log, interrupted) -> History:
    loss_fn = LOSSES[loss]
    batches_per_epoch = math.ceil(len(data) / batch_size)
    total_steps = steps if steps is not None else epochs * batches_per_epoch
    eval_every = eval_every or batches_per_epoch
    config = resuming.run_config(model, optimizer, schedule, loss, seed, batch_size, clip_norm, eval_every,
                                 early_stopping, run_config)
    state = {"step": 0, "epoch": 0, "batch": 0, "sample": 0, "best_val": math.inf, "stale": 0, "best_step": None}
    history = History()
    if resume:
        history, state = resuming.restore(model, optimizer, schedule, out, config, log)
    history.best_step, history.written = state.get("best_step"), []
    check_every = 1 if model.device == "cpu" else 25
    xp = _xp(model)
    watch = DivergenceWatch(xp)
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=(None if progress is None else not progress),
               unit="step", dynamic_ncols=True)
    running, running_count, started = state.pop("running", 0.0), state.pop("running_count", 0), time.perf_counter()
    stop = state["step"] >= total_steps
    if stop and resume:
        log(f"resume: the run is already at step {state['step']}, which reaches the {total_steps} steps asked for; "
            "nothing to train (ask for more steps or epochs)")
    while not stop:
        epoch_rng = numpy.random.default_rng([seed, state["epoch"]])
        for idx in minibatches(len(data), batch_size, epoch_rng, start=state["batch"], offset=state["sample"]):
            xb, yb = data.get(idx, numpy.random.default_rng([seed, state["epoch"], state["batch"]]))
            try:
                xb = apply_preprocess(model.preprocess, to_device(xb, model.device), xp)
                value, grad = loss_fn(model.forward(xb), to_device(yb, model.device))
                model.backward_params(grad)  # parameter gradients; nobody reads the input gradient
                if clip_norm:
                    clip_grad_norm(model, clip_norm)
                optimizer.step()
            except Exception as exc:
                if type(exc).__name__ == "OutOfMemoryError":  # cupy.cuda.memory.OutOfMemoryError
                    raise DeviceOutOfMemory(f"the GPU ran out of memory in step {state['step'] + 1} with a batch of "
                                            f"{len(idx)} ({exc}); try a smaller batch size (--batch-size)") from exc
                raise
            running, running_count = running + value, running_count + 1
            state["step"] += 1
            state["batch"] += 1
            state["sample"] += len(idx)
            watch.observe(value, state["step"])  # on a GPU a device-side record: no wait here
            bar.update(1)
            if state["step"] % check_every == 0 or state["step"] % eval_every == 0:
                current = item(value)  # the host waits for the step here: device-side errors raise too
                _check_finite(watch, state, out, history)
                bar.set_postfix(loss=f"{current:.4f}", refresh=False)
            if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                train_loss = item(running) / running_count
                record = _evaluate_point(model, val, loss, state, train_loss, optimizer, started)
                running, running_count = 0.0, 0
                history.append(record)
                _check_evaluation(model, record, state, out, history)
                stop = _after_evaluation(model, optimizer, schedule, history, record, state, out, early_stopping,
                                         config)
                stop = stop or state["step"] >= total_steps
            if interrupted.is_set() and not stop:  # Ctrl-C: save what a resume needs after this step, then stop
                _interrupt(model, optimizer, schedule, history, state, out, config, running, running_count)
            if stop:
                break
        else:
            state["epoch"], state["batch"], state["sample"] = state["epoch"] + 1, 0, 0
    bar.close()
    if out is not None:
        history.written += history.write(out)
        if len(history):
            history.plot(out / "history.png")
            history.written.append(out / "history.png")
    history.best_step = state.get("best_step")
    if restore_best and out is not None and val is not None and history.best_step is not None \
            and (out / "model.safetensors").exists():
        model.load_state_dict(checkpoint.read_checkpoint(out / "model.safetensors")[0])
    return history


def _xp(model):
    return ops_for_device(model.device).xp


def _check_finite(watch, state: dict, out, history) -> None:
    """Raise TrainingDiverged at the first step whose loss was not finite (exact on every device)."""
    bad = watch.first_bad()
    if bad is not None:
        step, value = bad
        history.append({"step": step, "epoch": state["epoch"] + 1, "train_loss": value, "val_loss": None,
                        "diverged": True})
        _diverged(f"loss became {value} at step {step}", state, out, history)


def _check_evaluation(model, record, state, out, history) -> None:
    """Raise TrainingDiverged when an evaluation or the weights are not finite: nothing is saved then."""
    losses = [k for k in ("train_loss", "val_loss") if record.get(k) is not None and not math.isfinite(record[k])]
    tensor = None if losses else first_non_finite_tensor(model)
    if losses or tensor is not None:
        record["diverged"] = True
        what = (f"{losses[-1].replace('_', ' ').replace('val', 'validation')} became {record[losses[-1]]}" if losses
                else f"weight {tensor!r} became NaN or infinite")
        _diverged(f"{what} at step {record['step']}", state, out, history)


def _diverged(what: str, state: dict, out, history) -> None:
    if out is None:
        where = ""
    elif state.get("last_step") is not None:
        where = f"; last good checkpoint: {out / 'last.safetensors'} (step {state['last_step']})"
    elif (out / "last.safetensors").exists():
        where = f"; last good checkpoint: {out / 'last.safetensors'} (of an earlier run in this folder, not this one)"
    else:
        where = "; no checkpoint was saved (it diverged before its first evaluation)"
    if out is not None:
        history.write(out)  # the diverged record, its non-finite values as null
    raise TrainingDiverged(f"{what} (epoch {state['epoch'] + 1}); training stopped{where}. "
                           "Try a lower learning rate (--lr) or gradient clipping (--clip-norm).")


def _interrupt(model, optimizer, schedule, history, state, out, config, running, running_count) -> None:
    """Save last.safetensors at this step (with the running train loss, so a resume is exact)."""
    if first_non_finite_tensor(model) is not None:
        raise TrainingInterrupted(f"interrupted at step {state['step']}; the weights are not finite, so nothing "
                                  "was saved")
    state["last_step"] = state["step"]
    resuming.save_last(model, optimizer, schedule, history,
                       {**state, "running": item(running) if running_count else 0.0, "running_count": running_count},
                       config, out)
    history.write(out)
    raise TrainingInterrupted(f"interrupted at step {state['step']}; saved {out / 'last.safetensors'}: "
                              "run the same command with --resume to continue")


def _evaluate_point(model, val, loss, state, train_loss, optimizer, started) -> dict:
    record = {"step": state["step"], "epoch": state["epoch"] + 1, "train_loss": train_loss, "val_loss": None,
              "lr": optimizer.lr, "seconds": round(time.perf_counter() - started, 3)}
    if val is not None:
        result = evaluate(model, *val, loss=loss) if isinstance(val, tuple) else val.evaluate(model, loss)
        record["val_loss"] = result["loss"]
        if "accuracy" in result:
            record["val_accuracy"] = result["accuracy"]
    return record


def _after_evaluation(model, optimizer, schedule, history, record, state, out, patience, config) -> bool:
    """Schedule, best/last checkpoints, early stopping; True when training should stop."""
    if schedule is not None:
        schedule.step()
    score = record["val_loss"] if record["val_loss"] is not None else record["train_loss"]
    improved = score < state["best_val"]
    if improved:
        state["best_val"], state["stale"], state["best_step"] = score, 0, record["step"]
    else:
        state["stale"] += 1
    if out is not None:
        if improved:
            checkpoint.save(model, out / "model.safetensors")
            history.written.append(out / "model.safetensors")
        state["last_step"] = state["step"]
        resuming.save_last(model, optimizer, schedule, history, state, config, out)
        history.written.append(out / "last.safetensors")
        history.write(out)
    return patience is not None and state["stale"] >= patience
