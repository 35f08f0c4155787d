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

from gpunet import checkpoint, random
from gpunet.backend import ops_for_device, to_device
from gpunet.data.pipeline import apply_preprocess, minibatches, random_shift
from gpunet.history import History
from gpunet.losses import LOSSES
from gpunet.optim import clip_grad_norm


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class DeviceOutOfMemory(MemoryError):
    """The GPU ran out of memory during training."""


class ArrayData:
    """In-memory (x, y) training data with optional random image shifts."""

    def __init__(self, x, y, shift: int = 0):
        if len(x) != len(y):
            raise ValueError(f"training data: {len(x)} inputs but {len(y)} labels")
        if x.dtype.kind == "f" and not numpy.isfinite(x).all():
            bad = numpy.argwhere(~numpy.isfinite(x))[0]
            raise ValueError(f"training data: input contains NaN or Inf (first at index {tuple(int(i) for i in bad)})")
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
            total += float(value) * len(idx)
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
        seed: int = 0, progress: bool | None = None, restore_best: bool = True) -> History:
    """Train model in place and return its History.

    train/val: (x, y) raw arrays (the model's preprocess is applied per batch) or an object with
    __len__ and get(indices, rng). Stops after `epochs` or after `steps` optimizer steps; evaluates
    at each epoch end, or every `eval_every` steps. schedule.step() is called after each
    evaluation. early_stopping: evaluations without a better val_loss before stopping.
    With out_dir: history.json, metrics.csv, history.png, model.safetensors (the best model by
    val_loss) and last.safetensors (everything needed to resume).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("fit: give exactly one of epochs or steps")
    data = ArrayData(*train) if isinstance(train, tuple) else train
    loss_fn = LOSSES[loss]
    batches_per_epoch = math.ceil(len(data) / batch_size)
    total_steps = steps if steps is not None else epochs * batches_per_epoch
    eval_every = eval_every or batches_per_epoch
    out = Path(out_dir) if out_dir is not None else None
    state = {"step": 0, "epoch": 0, "batch": 0, "best_val": math.inf, "stale": 0}
    history = History()
    if resume:
        history, state = _resume(model, optimizer, schedule, out)
    check_every = 1 if model.device == "cpu" else 25
    xp = _xp(model)
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=(None if progress is None else not progress),
               unit="step", dynamic_ncols=True)
    running, running_count, started = 0.0, 0, time.perf_counter()
    stop = state["step"] >= total_steps
    while not stop:
        epoch_rng = numpy.random.default_rng([seed, state["epoch"]])
        for idx in minibatches(len(data), batch_size, epoch_rng, start=state["batch"]):
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
            bar.update(1)
            if state["step"] % check_every == 0 or state["step"] % eval_every == 0:
                _check_finite(float(value), state, out)
                bar.set_postfix(loss=f"{float(value):.4f}", refresh=False)
            if state["step"] % eval_every == 0 or state["step"] >= total_steps:
                record = _evaluate_point(model, val, loss, state, float(running) / running_count, optimizer, started)
                running, running_count = 0.0, 0
                history.append(record)
                stop = _after_evaluation(model, optimizer, schedule, history, record, state, out, early_stopping)
                stop = stop or state["step"] >= total_steps
            if stop:
                break
        else:
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
    bar.close()
    if out is not None:
        history.write(out)
        if len(history):
            history.plot(out / "history.png")
    if restore_best and out is not None and val is not None and (out / "model.safetensors").exists():
        model.load_state_dict(checkpoint.read_checkpoint(out / "model.safetensors")[0])
    return history


def _xp(model):
    return ops_for_device(model.device).xp


def _check_finite(value: float, state: dict, out) -> None:
    if not math.isfinite(value):
        where = f"; last good checkpoint: {out / 'last.safetensors'}" if out and (out / "last.safetensors").exists() else ""
        raise TrainingDiverged(f"loss became {value} at step {state['step']} (epoch {state['epoch'] + 1}); "
                               f"training stopped{where}. Try a lower learning rate or gradient clipping.")


def _evaluate_point(model, val, loss, state, train_loss, optimizer, started) -> dict:
    record = {"step": state["step"], "epoch": state["epoch"] + 1, "train_loss": train_loss, "val_loss": None,
              "lr": optimizer.lr, "seconds": round(time.perf_counter() - started, 3)}
    if val is not None:
        result = evaluate(model, *val, loss=loss) if isinstance(val, tuple) else val.evaluate(model, loss)
        record["val_loss"] = result["loss"]
        if "accuracy" in result:
            record["val_accuracy"] = result["accuracy"]
    return record


def _after_evaluation(model, optimizer, schedule, history, record, state, out, patience) -> bool:
    """Schedule, best/last checkpoints, early stopping; True when training should stop."""
    if schedule is not None:
        schedule.step()
    score = record["val_loss"] if record["val_loss"] is not None else record["train_loss"]
    improved = score < state["best_val"]
    if improved:
        state["best_val"], state["stale"] = score, 0
    else:
        state["stale"] += 1
    if out is not None:
        if improved:
            checkpoint.save(model, out / "model.safetensors")
        _save_last(model, optimizer, schedule, history, state, out)
        history.write(out)
    return patience is not None and state["stale"] >= patience


def _save_last(model, optimizer, schedule, history, state, out) -> None:
    arrays, meta = optimizer.state_dict()
    training = {"state": state, "optimizer": meta, "rng": random.get_state(),
                "schedule": getattr(schedule, "count", None), "history": history.records}
    checkpoint.save(model, out / "last.safetensors", extra_tensors=arrays, extra_metadata={"training": training})


def _resume(model, optimizer, schedule, out):
    if out is None or not (out / "last.safetensors").exists():
        raise FileNotFoundError(f"cannot resume: no {out / 'last.safetensors' if out else 'out_dir'} to resume from")
    weights, arrays, meta = checkpoint.read_checkpoint(out / "last.safetensors")
    model.load_state_dict(weights)
    training = meta["training"]
    optimizer.load_state_dict(arrays, training["optimizer"])
    random.set_state(training["rng"])
    if schedule is not None and training["schedule"] is not None:
        schedule.count = training["schedule"]
        optimizer.lr = schedule.lr_at(schedule.count)
    return History(training["history"]), dict(training["state"])
