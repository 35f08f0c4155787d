"""What a resume needs: last.safetensors (weights, optimizer, random state, position, history and
the run's hyper-parameters), restoring it, and stopping cleanly on Ctrl-C.

A resumed run compares its hyper-parameters with the saved ones: a change that would make the
run a different experiment (architecture, loss, seed, optimizer type, dataset, validation split)
is refused with the list of differences; the others (learning rate, batch size, clipping,
evaluation interval, schedule, optimizer settings) are applied and said. A new batch size goes
on from the same sample of the epoch, not from the old batch index.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
from dataclasses import dataclass, fields

from gpunet import checkpoint, random
from gpunet.history import History
from gpunet.losses import item

# a different value here makes another experiment: refused on resume
REFUSED = ("architecture", "loss", "seed", "optimizer", "model", "dataset", "val_fraction")


@dataclass
class LoopState:
    """Where the fit loop is and what it has seen: all a resume needs besides the weights, the
    optimizer, the schedule and the random state (saved as JSON in last.safetensors)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches taken in the current epoch
    sample: int = 0  # samples served in the current epoch (a resume with a new batch size goes on from here)
    best_loss: float = math.inf  # the lowest monitored loss: val_loss, or train_loss without validation data
    stale: int = 0  # evaluations since best_loss last improved (early stopping counts them)
    best_step: int | None = None  # the step whose weights model.safetensors holds
    last_step: int | None = None  # the step last.safetensors holds, when this run wrote it
    running: object = 0.0  # sum of the train losses since the last evaluation (a device scalar on a GPU)
    running_count: int = 0

    # names an older gpunet saved: best_val held the training loss too, when there was no validation data
    _RENAMED = {"best_val": "best_loss"}

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["running"] = item(self.running) if self.running_count else 0.0  # the host waits here, once
        return values

    @classmethod
    def from_json(cls, saved: dict) -> LoopState:
        known = {f.name for f in fields(cls)}
        values = {cls._RENAMED.get(k, k): v for k, v in saved.items()}
        return cls(**{k: v for k, v in values.items() if k in known})


def run_config(model, optimizer, schedule, *, loss, seed, batch_size, clip_norm, eval_every, early_stopping,
               extra=None) -> dict:
    """The hyper-parameters of a run, JSON-able, as compared on resume."""
    config = {"architecture": model.to_config(), "loss": loss, "seed": seed, "optimizer": type(optimizer).__name__,
              "lr": schedule.base_lr if schedule is not None else optimizer.lr, "batch_size": batch_size,
              "clip_norm": clip_norm or None, "eval_every": eval_every, "early_stopping": early_stopping,
              "schedule": _describe_schedule(schedule)}
    config.update({f"optimizer.{k}": v for k, v in optimizer.hyper.items()})
    config.update(extra or {})
    return json.loads(json.dumps(config))  # tuples become lists, as they come back from the file


def _describe_schedule(schedule):
    if schedule is None:
        return None
    keep = {k: v for k, v in vars(schedule).items()
            if k not in ("optimizer", "count", "base_lr") and isinstance(v, (int, float, str, bool))}
    return {"type": type(schedule).__name__, **keep}


def differences(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """(refused, applied) differences as 'name: old -> new' lines."""
    refused, applied = [], []
    saved, new = _flat(saved), _flat(new)
    for key in sorted(set(saved) | set(new)):
        old, now = saved.get(key), new.get(key)
        if old == now:
            continue
        line = f"{key}: {_short(old)} -> {_short(now)}" if key != "architecture" else "the model's architecture differs"
        (refused if key in REFUSED else applied).append(line)
    return refused, applied


def _flat(config: dict) -> dict:
    """Nested settings (the schedule's) as 'schedule.t_max' keys; the architecture stays whole."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "architecture":
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def save_last(out, model, optimizer, schedule, *, state: LoopState, history: History, config: dict) -> None:
    """Write out/last.safetensors: everything restore needs to go on exactly from state."""
    arrays, meta = optimizer.state_dict()
    training = {"state": state.to_json(), "optimizer": meta, "rng": random.get_state(),
                "schedule": getattr(schedule, "count", None), "schedule_unit": "step", "history": history.records, "config": config}
    checkpoint.save(model, out / "last.safetensors", extra_tensors=arrays, extra_metadata={"training": training})


def restore(out, model, optimizer, schedule, *, config: dict, log=print,
            samples: int | None = None) -> tuple[History, LoopState]:
    """Load out/last.safetensors into model, optimizer, schedule and the random state; returns
    (history, state). Raises ValueError listing refused differences. samples: the size of the
    training data, to read the evaluation interval an older gpunet saved (see _saved_as_now)."""
    if out is None or not (out / "last.safetensors").exists():
        raise FileNotFoundError(f"cannot resume: no {out / 'last.safetensors' if out else 'out_dir'} to resume from")
    path = out / "last.safetensors"
    weights, arrays, meta = checkpoint.read_checkpoint(path)
    training = meta.get("training")
    if not isinstance(training, dict) or "state" not in training:
        raise ValueError(f"{path}: holds no training state to resume from (is it a model.safetensors?)")
    saved = training.get("config")
    if saved is not None:
        saved = _saved_as_now(saved, config, samples)
        refused, applied = differences(saved, config)
        if refused:
            raise ValueError(f"cannot resume {path}: " + "; ".join(refused) + " (resume with the run's own "
                             "values, or start a new run)")
        if applied:
            log(f"resume: applying changed settings from step {training['state']['step']}: " + "; ".join(applied))
    try:
        model.load_state_dict(weights)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot resume {path}: it does not match this model ({exc})") from None
    new_lr = optimizer.lr
    optimizer.load_state_dict(arrays, training["optimizer"])
    random.set_state(training["rng"])
    if schedule is not None and training["schedule"] is not None:
        schedule.count = training["schedule"]
        if training.get("schedule_unit") != "step":  # saved when schedules advanced once per evaluation
            schedule.count = int(training["state"]["step"])
            log(f"resume: {path} was saved when learning-rate schedules advanced once per evaluation; the "
                f"schedule now advances every optimizer step and goes on from step {schedule.count}")
        optimizer.lr = schedule.lr_at(schedule.count)
    elif saved is not None and saved.get("lr") != config.get("lr"):
        optimizer.lr = new_lr
    if optimizer.lr == 0:
        log(f"resume: the learning rate is 0 from step {training['state']['step']} on (the schedule ended with the "
            "saved run), so further steps leave the weights as they are; start a new run to train longer")
    state = LoopState.from_json(training["state"])
    if "sample" not in training["state"]:  # written before positions were kept in samples
        state.sample = state.batch * (saved or config).get("batch_size", config["batch_size"])
    if "best_step" not in training["state"] and (out / "model.safetensors").exists() and training["history"]:
        scored = [r for r in training["history"] if r.get("val_loss") is not None]
        if scored:
            state.best_step = min(scored, key=lambda r: r["val_loss"])["step"]
    return History(training["history"]), state


def _saved_as_now(saved: dict, config: dict, samples: int | None) -> dict:
    """An older gpunet saved the evaluation interval it derived (the batches of an epoch) where the
    caller gave none; it meant "at each epoch end", which is saved as None now: read it so, so that a
    resume does not report a change nobody made."""
    every, batch = saved.get("eval_every"), saved.get("batch_size")
    if (samples and config.get("eval_every") is None and isinstance(every, int) and isinstance(batch, int)
            and batch > 0 and every == math.ceil(samples / batch)):
        return {**saved, "eval_every": None}
    return saved


@contextlib.contextmanager
def stop_on_interrupt(enabled: bool = True):
    """While inside, Ctrl-C (SIGINT) sets the yielded Event instead of raising, so the loop can
    finish its step and save what a resume needs; a second Ctrl-C raises KeyboardInterrupt."""
    flag = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        flag.set()
        print("\ngpunet: stopping after this step and saving what --resume needs (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
