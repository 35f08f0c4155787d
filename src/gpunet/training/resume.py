"""What a resume needs: last.safetensors (weights, optimizer, random state, position, history, the
run's hyper-parameters and a fingerprint of its data), restoring it, and stopping cleanly on Ctrl-C,
SIGTERM or SIGHUP.

A resumed run compares its hyper-parameters with the saved ones: a change that would make the
run a different experiment (architecture, loss, seed, optimizer type, dataset, validation split)
is refused with the list of differences; the others (learning rate, batch size, clipping,
evaluation interval, schedule, optimizer settings, gradient accumulation) are applied and said. A new
batch size (or accumulate) goes on from the same sample of the epoch, not from the old batch index.
Training data that changed since
the run was saved (shape, dtype or content of an array) is refused too, unless allow_data_change.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import threading
from dataclasses import dataclass, fields

import numpy

from gpunet import random
from gpunet.training import checkpoint
from gpunet.training.history import History
from gpunet.losses import item

# a different value here makes another experiment: refused on resume
REFUSED = ("architecture", "loss", "seed", "optimizer", "model", "dataset", "val_fraction")
FINGERPRINT = "data_fingerprint"  # the config entry of the data's fingerprint: compared on its own (check_data)


@dataclass
class LoopState:
    """Where the fit loop is and what it has seen: all a resume needs besides the weights, the
    optimizer, the schedule and the random state (saved as JSON in last.safetensors)."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches taken in the current epoch
    sample: int = 0  # samples served in the current epoch (a resume with a new batch size goes on from here)
    best_loss: float = math.inf  # the lowest monitored loss: val_loss, or train_loss without validation data
    stale: int = 0  # read from runs saved before callbacks kept state: evaluations without a lower loss
    callbacks: list | None = None  # each callback's state_dict (gpunet.training.callbacks.Events.state_dicts); None: none saved
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
               extra=None, data=None, accumulate: int = 1, precision: str = "fp32") -> dict:
    """The hyper-parameters of a run, JSON-able, as compared on resume; data: the data's fingerprint
    (data_fingerprint), saved and compared with them."""
    config = {"architecture": model.to_config(), "loss": loss, "seed": seed, "optimizer": type(optimizer).__name__,
              "lr": schedule.base_lr if schedule is not None else optimizer.lr, "batch_size": batch_size,
              "accumulate": accumulate, "precision": precision,
              "clip_norm": clip_norm or None, "eval_every": eval_every, "early_stopping": early_stopping,
              "schedule": _describe_schedule(schedule)}
    config.update({f"optimizer.{k}": v for k, v in optimizer.hyper.items()})
    config.update(extra or {})
    config[FINGERPRINT] = data
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
        if old == now or key.split(".")[0] == FINGERPRINT:  # (check_data compares it, and names the array)
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


# a training source's arrays, by attribute (gn.train.ArrayData: x and y; CharWindows: ids), and a validation
# tuple's, as a fingerprint names them
TRAIN_ARRAYS = (("x", "training inputs"), ("y", "training targets"), ("ids", "training text"))
VAL_ARRAYS = ("validation inputs", "validation targets")


def data_fingerprint(train, val=None) -> dict | None:
    """Shape, dtype and a blake2b hash of the bytes of each array of the training data (and of a
    validation (x, y) tuple): what a resume compares to know it goes on with the same data (blake2b:
    0.1 s for 100 MB on an idle core). A training source that keeps its data in other attributes
    has none (None): it is not checked."""
    arrays = _each([(name, getattr(train, attr, None)) for attr, name in TRAIN_ARRAYS])
    if not any(isinstance(a, numpy.ndarray) for _, a in arrays):
        return None
    if isinstance(val, tuple) and len(val) == len(VAL_ARRAYS):
        arrays += _each(list(zip(VAL_ARRAYS, val)))
    return {name: _array_fingerprint(a) for name, a in arrays
            if isinstance(a, numpy.ndarray) and not a.dtype.hasobject}


def _each(named: list) -> list:
    """(name, array) pairs, a list of arrays (several inputs or outputs) as one pair each: "training inputs 0", ..."""
    return [pair for name, a in named
            for pair in ([(f"{name} {i}", item) for i, item in enumerate(a)] if isinstance(a, list) else [(name, a)])]


def _array_fingerprint(a: numpy.ndarray) -> dict:
    data = memoryview(numpy.ascontiguousarray(a).reshape(-1).view(numpy.uint8))  # any dtype's bytes, in C order
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()  # type: ignore[arg-type]  # (numpy's buffer hint)
    return {"shape": list(a.shape), "dtype": str(a.dtype), "blake2b": digest}


def check_data(path, saved: dict, config: dict, allow_change: bool, log=print) -> None:
    """Refuse a resume whose data differs from the fingerprint saved with the run, naming each array
    that changed and how; allow_change goes on (saying so). A run saved before fingerprints resumes,
    with a note; data without a fingerprint (a custom source) is not checked."""
    now = config.get(FINGERPRINT)
    if FINGERPRINT not in saved:
        if now is not None:
            log(f"resume: {path} was saved before gpunet kept a fingerprint of the training data, so a change of "
                "the data cannot be seen; the run goes on (and saves one from now on)")
        return
    old = saved[FINGERPRINT]
    if old is None or now is None or old == now:
        return
    changes = [_data_change(name, old.get(name), now.get(name)) for name in sorted(set(old) | set(now))
               if old.get(name) != now.get(name)]
    where = f" of {config['dataset']}" if str(config.get("dataset", "")).startswith("--data ") else ""
    what = f"the data{where} changed since the run was saved: " + "; ".join(changes)
    if not allow_change:
        raise ValueError(f"cannot resume {path}: {what} (resume with the data the run trained on, or go on with the "
                         "changed data: --allow-data-change, in gn.fit allow_data_change=True)")
    log(f"resume: going on with changed data, as allowed: {what}")


def _data_change(name: str, old: dict | None, now: dict | None) -> str:
    if old is None:
        return f"{name}: given now, not in the saved run"
    if now is None:
        return f"{name}: in the saved run, not given now"
    for key in ("shape", "dtype"):
        if old.get(key) != now.get(key):
            show = (lambda v: str(tuple(v))) if key == "shape" else str
            return f"{name}: {key} {show(old.get(key))} -> {show(now.get(key))}"
    return f"{name}: other content, same shape {tuple(now['shape'])} and dtype {now['dtype']}"


def save_last(out, model, optimizer, schedule, *, state: LoopState, history: History, config: dict,
              loss_scale: dict | None = None) -> None:
    """Write out/last.safetensors: everything restore needs to go on exactly from state (loss_scale: an fp16
    run's LossScaler.state_dict())."""
    arrays, meta = optimizer.state_dict()
    training = {"state": state.to_json(), "optimizer": meta, "rng": random.get_state(),
                "schedule": getattr(schedule, "count", None), "schedule_unit": "step", "history": history.records, "config": config}
    if loss_scale is not None:
        training["loss_scale"] = loss_scale
    checkpoint.save(model, out / "last.safetensors", extra_tensors=arrays, extra_metadata={"training": training})


def saved_precision(out) -> str:
    """The precision the run in out trained in (fp32 for a run saved before precisions, or with none saved)."""
    path = out / "last.safetensors" if out is not None else None
    if path is None or not path.exists():
        return "fp32"  # (restore says what is missing)
    training = checkpoint.read_checkpoint(path)[2].get("training")
    config = training.get("config") if isinstance(training, dict) else None
    value = config.get("precision", "fp32") if isinstance(config, dict) else "fp32"
    return value if value in ("fp32", "bf16", "fp16") else "fp32"


def restore(out, model, optimizer, schedule, *, config: dict, log=print, samples: int | None = None,
            allow_data_change: bool = False, loss_scale=None) -> tuple[History, LoopState]:
    """Load out/last.safetensors into model, optimizer, schedule, the random state and loss_scale (an fp16
    run's LossScaler, when the run saved one: else it starts afresh); returns (history, state). Raises
    ValueError listing refused differences, or naming the arrays of the data that changed (unless
    allow_data_change: then log says so). samples: the size of the training data, to read the
    evaluation interval an older gpunet saved (see _saved_as_now)."""
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
        check_data(path, saved, config, allow_data_change, log)
        if applied:
            log(f"resume: applying changed settings from step {training['state']['step']}: " + "; ".join(applied))
    try:
        model.load_state_dict(weights)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"cannot resume {path}: it does not match this model ({exc})") from None
    new_lr = optimizer.lr
    optimizer.load_state_dict(arrays, training["optimizer"])
    random.set_state(training["rng"])
    if loss_scale is not None and isinstance(training.get("loss_scale"), dict):
        loss_scale.load_state_dict(training["loss_scale"])
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
    resume does not report a change nobody made. A run saved before accumulation took one batch a step."""
    if "accumulate" not in saved:  # saved before gradient accumulation: one batch a step
        saved = {**saved, "accumulate": 1}
    if "precision" not in saved:  # saved before mixed precision: float32
        saved = {**saved, "precision": "fp32"}
    every, batch = saved.get("eval_every"), saved.get("batch_size")
    if (samples and config.get("eval_every") is None and isinstance(every, int) and isinstance(batch, int)
            and batch > 0 and every == math.ceil(samples / batch)):  # (an older gpunet: a batch was a step)
        return {**saved, "eval_every": None}
    return saved


# The signals that stop a command as Ctrl-C does: SIGTERM is what SLURM, Kubernetes and Docker send before they
# kill a job, SIGHUP what a closed terminal or a lost ssh session sends; both would otherwise end the process on the
# spot, losing the steps since the last evaluation. (SIGQUIT, Ctrl-\, keeps its meaning: quit now, with a core.)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A command (or fit) stopped by a signal; signum says which, and the command line exits with
    128 + signum: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP. A KeyboardInterrupt, so what
    catches Ctrl-C catches the others too."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def interrupted_by(signum) -> str:
    """How a message names what stopped a command: 'interrupted' (Ctrl-C), 'interrupted by SIGTERM'."""
    return "interrupted" if signum in (None, signal.SIGINT) else f"interrupted by {signal.Signals(signum).name}"


def interruption(stopped: BaseException, what: str) -> Interrupted:
    """A new Interrupted saying interrupted_by(its signal) + what, for the same signal as stopped
    (a KeyboardInterrupt caught on its way out, e.g. a search's trial)."""
    signum = getattr(stopped, "signum", signal.SIGINT)
    return Interrupted(interrupted_by(signum) + what, signum)


class StopRequest(threading.Event):
    """Set by the first stop signal inside stop_on_interrupt; signum: which one."""

    def __init__(self):
        super().__init__()
        self.signum = signal.SIGINT


@contextlib.contextmanager
def _handling(signums, handler):
    """handler for each of signums while inside, then the handlers from before. A signal ignored when
    this starts stays ignored (nohup ignores SIGHUP; a shell script's background job, SIGINT).
    Yields {signum: previous handler} of those it took (none outside the main thread)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            before = signal.getsignal(signum)
            if before is not signal.SIG_IGN:
                previous[signum] = before
                signal.signal(signum, handler)
    try:
        yield previous
    finally:
        _put_back(previous)


def _put_back(previous: dict) -> None:
    for signum, before in previous.items():
        if before is None:  # set outside Python: the nearest Python equivalent
            before = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, before)


@contextlib.contextmanager
def interrupt_on_signals():
    """While inside, SIGTERM and SIGHUP raise Interrupted where the program is, as Ctrl-C raises
    KeyboardInterrupt: a command ends through its own clean-up (locks released, temporaries
    removed, a folder it made removed while empty) and one line, not on the spot. The command line
    runs every command inside it; fit's stop_on_interrupt takes over while training."""
    def handler(signum, frame):
        raise Interrupted(interrupted_by(signum), signum)

    with _handling(STOP_SIGNALS[1:], handler):
        yield


@contextlib.contextmanager
def stop_on_interrupt(enabled: bool = True):
    """While inside, Ctrl-C, SIGTERM or SIGHUP set the yielded StopRequest instead of raising, so the
    loop can finish its step and save what a resume needs; a second one raises Interrupted at once.
    Saves are atomic (gpunet.files.atomic_write), so a save cut short leaves the file it would have
    replaced as it was."""
    flag = StopRequest()
    if not enabled:
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            _put_back(previous)
            raise Interrupted(f"stopped at once by a second {_name(signum)}: the run folder holds what its last "
                              "complete save wrote", signum)
        flag.signum = signum
        flag.set()
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
        _say(f"\ngpunet: {'' if signum == signal.SIGINT else _name(signum) + ': '}stopping after this step and "
             f"saving what --resume needs ({again} stops at once)")

    with _handling(STOP_SIGNALS, handler) as previous:
        yield flag


def _name(signum) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _say(line: str) -> None:
    """A line on stderr from a signal handler; after a hang-up stderr may be gone, which must not stop the save."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
