"""fit and evaluate: checked arguments, the run folder, resume; the loop itself is gpunet.training.loop.

Randomness is derived, not carried: the order of epoch e comes from seed (seed, e) and the
augmentation of batch b from (seed, e, b), so a resumed run needs only the position and the
dropout generator's state to continue exactly where it stopped.
"""
from __future__ import annotations

from typing import Any

import numpy

from gpunet import validate
from gpunet.backend import precision as precisions
from gpunet.training import accumulate as accumulating, cuda_graph, loss_scale, resume as resuming, \
    builtin_callbacks as training_callbacks
from gpunet.training.callbacks import check as check_callbacks
from gpunet.layers import inputs as arrays
from gpunet.data.pipeline import random_shift
from gpunet.training.history import History
from gpunet.layers import Layer
# re-exported: the loop raises them, callers catch them from here
from gpunet.errors import DeviceOutOfMemory  # noqa: F401  (gn.train.DeviceOutOfMemory, as fit raises it)
from gpunet.training.loop import TrainingDiverged, TrainingInterrupted, _evaluate, _Run  # noqa: F401
from gpunet.losses import metric, resolve
from gpunet.optim import Optimizer
from gpunet.training.setup import RunSetup


class ArrayData:
    """In-memory (x, y) training data with optional random image shifts. x is a list of arrays for a model
    with several inputs, y a list for several outputs (gpunet.layers.inputs)."""

    def __init__(self, x, y, shift: int = 0):
        if arrays.samples(x) != arrays.samples(y):
            raise ValueError(f"training data: {arrays.samples(x)} inputs but {arrays.samples(y)} labels")
        if shift and isinstance(x, list):
            raise ValueError("training data: random shifts are for one image input, not a list of inputs")
        arrays.each(lambda a: validate.finite_array(a, "training data"), x)
        arrays.each(lambda a: validate.finite_array(a, "training data", "targets"), y)
        self.x, self.y, self.shift = x, y, shift

    def __len__(self) -> int:
        return arrays.samples(self.x)

    def get(self, indices, rng):
        x = arrays.take(self.x, indices)
        if self.shift:
            x = random_shift(x, self.shift, rng)
        return x, arrays.take(self.y, indices)


def evaluate(model, x, y, loss="softmax_cross_entropy", batch_size: int | None = None, loss_weights=None,
             precision: str = "fp32") -> dict:
    """Mean loss (and accuracy for classification) over raw inputs x and targets y.

    batch_size defaults to 1000 samples, or fewer for sequences (32,768 targets a batch). x and y may be
    nested Python lists (converted as gpunet.layers.inputs says). A gn.Model with several inputs takes x as a
    list; one with several outputs takes y as a list, loss as a list (one per output) and loss_weights, and
    reports the weighted total "loss" with "loss_i" and "accuracy_i" per output. precision: "fp32" (the default,
    whatever the model trained in), "bf16" or "fp16" (gpunet.backend.precision).
    """
    _check_model(model, "evaluate")
    resolve(loss, loss_weights, "evaluate")
    arrays.check_losses(model, loss, "evaluate")
    x, y = arrays.inputs(model, x, "evaluate"), arrays.targets(model, y, "evaluate", loss)
    if arrays.samples(x) != arrays.samples(y):
        raise ValueError(f"evaluate: {arrays.samples(x)} inputs but {arrays.samples(y)} targets")
    validate.not_empty(arrays.samples(x), "evaluate")
    validate.positive_int("evaluate: batch_size", batch_size, allow_none=True)
    _check_arrays(model, x, y, loss, "evaluate")
    with precisions.using(precisions.check(precision, "evaluate")):
        return _evaluate(model, x, y, loss, batch_size, loss_weights)


def fit(model: Layer, train: Any, val: Any = None, *, optimizer: Optimizer, loss: str = "softmax_cross_entropy", epochs: int | None = None,
        steps: int | None = None, batch_size: int = 128, eval_every: int | None = None, schedule=None,
        clip_norm: float | None = None, early_stopping: int | None = None, out_dir=None, resume: bool = False,
        seed: int = 0, progress: bool | None = None, restore_best: bool = True, run_config: dict | None = None,
        log=print, overwrite: bool = False, callbacks: list | None = None, cuda_graph: bool | None = None,
        allow_data_change: bool = False, setup: RunSetup | None = None, accumulate: int = 1,
        loss_weights: list | None = None, precision: str | None = None) -> History:
    """Train model in place and return its History.

    train: (x, y) raw arrays (the model's preprocess is applied per batch; for a gn.Model with several inputs x is
    a list of arrays, one per input, and model.preprocess a list of specs or None; with several outputs y is a
    list, loss a list of names, one per output, and loss_weights their weights: the step minimises
    sum_i w_i loss_i, and evaluations record val_loss_i and val_accuracy_i per output) or an object with
    __len__ and get(indices, rng). val: (x, y) raw arrays, evaluated in batches of batch_size, or an object with
    evaluate(model, loss) returning {"loss": ..., ["accuracy": ...]}. Arrays may be nested Python lists (gpunet.layers.inputs).
    optimizer: made with this model (gn.optim.Adam(model)); one made with another model or a part of
    this one is refused. Stops after `epochs` (counted in samples served, so a
    resume with another batch size still ends at the last epoch's end) or after `steps` optimizer
    steps; evaluates at each epoch end, or every `eval_every` steps, and at the end. schedule.step() is called
    after each optimizer step (gpunet.optim.CosineLR's t_max and warmup count optimizer steps).
    callbacks: objects with the hooks of gpunet.training.callbacks (on_step, on_evaluation, ...; docs/training.md says which
    fires when and in what order beside the built-in ones); an on_evaluation returning True stops training after
    that evaluation; a callback's state_dict() is saved with the run and restored on resume. The monitored loss is val_loss, or train_loss (the mean since the
    previous evaluation) without val; early_stopping: evaluations without a lower one before stopping.
    With out_dir: history.json, metrics.csv, history.png, model.safetensors (the model of the lowest
    monitored loss) and last.safetensors (everything needed to resume). An out_dir that already holds
    a run is refused (RunExists) unless resume=True continues it or overwrite=True moves it into
    out_dir/replaced-DATE-TIME (deleting nothing). The folder is locked while training (a second run
    into it fails at once) and temporaries of a dead run are removed.
    A non-finite loss or weight raises TrainingDiverged naming the step; nothing non-finite is
    saved. Ctrl-C, SIGTERM or SIGHUP save last.safetensors after the current step and raise
    TrainingInterrupted (its signum says which signal).
    resume: the hyper-parameters are compared with the saved run's (see gpunet.training.resume); run_config
    adds the caller's own (model, dataset, ...) to that comparison; log prints what is applied. The
    data is compared with the fingerprint saved with the run (shape, dtype and hash of its arrays): a
    change is refused unless allow_data_change=True.
    restore_best: with val and out_dir, the model ends with the weights of model.safetensors.
    cuda_graph: capture the step once per batch shape and replay it (gpunet.training.cuda_graph); None (the
    default) does so when the model is on a GPU, False never. A step that cannot be captured trains
    eagerly, after one line from log saying why.
    accumulate: batches of batch_size per optimizer step, their gradients summed weighted by their samples
    (gpunet.training.accumulate): the step of batch_size=accumulate*batch_size on the same samples in the
    same order, in the memory of one batch; steps, epochs, eval_every, schedules and checkpoints count
    optimizer steps.
    setup: a gpunet.training.setup.RunSetup (as `gpunet train` makes) deciding the device, the world, the locked run
    folder, resume, overwrite, seed and allow_data_change instead of those arguments; without it fit makes its own.
    precision: "fp32", or mixed precision "bf16" | "fp16" (gpunet.backend.precision: products of 16-bit operands in
    float32, master weights float32) for the steps and fit's own evaluations; None: fp32, or on resume the run's own.
    fp16 scales the loss dynamically (gpunet.training.loss_scale: a step whose gradients overflow is skipped, the
    schedule still advances); its records hold loss_scale and skipped_steps.
    The History returned has .best_step (of the saved model, or None) and .written (the files).
    """
    _check_model(model, "fit")
    _check_arguments(loss, epochs, steps, batch_size, eval_every, early_stopping, seed, clip_norm)
    resolve(loss, loss_weights, "fit")
    arrays.check_losses(model, loss, "fit")
    validate.positive_int("fit: accumulate", accumulate)
    if precision is not None:
        precisions.check(precision, "fit")
    _check_optimizer(model, optimizer)
    if setup is None:
        setup = RunSetup.for_fit(model.device, out_dir, resume=resume, overwrite=overwrite, seed=seed,
                                 allow_data_change=allow_data_change)
    else:
        _check_setup(setup, model, out_dir, resume, overwrite, seed, allow_data_change)
    hooks = check_callbacks(callbacks)
    data, val = _data(model, train, val, loss)
    if not setup.writes:  # only rank 0 writes the run folder and logs; the others read it to resume
        log = _quiet
    run = _Run(model, data, val, optimizer, schedule, setup, loss=loss, batch_size=batch_size, epochs=epochs,
               steps=steps, eval_every=eval_every, clip_norm=clip_norm, accumulate=accumulate, loss_weights=loss_weights)
    if accumulate > 1:  # (a dropped step puts the buffers back: only one process drops a step mid-way)
        run.accumulator = accumulating.Accumulator(model, optimizer, keep_buffers=setup.world.world_size == 1)
    run.callbacks = training_callbacks.ordered(run, hooks, progress, early_stopping)
    if cuda_graph or (cuda_graph is None and setup.on_gpu):
        run.graph = _graphed_step(run, log)
    out = setup.out
    with setup.session(log), resuming.stop_on_interrupt(out is not None) as interrupted:
        # None: fp32 for a new run, a resumed run's own (another one, given, is applied and said on resume)
        run.precision = precision or (resuming.saved_precision(out) if setup.resume else "fp32")
        run.scaler = loss_scale.LossScaler() if run.precision == "fp16" else None  # (bf16: float32's exponent range)
        run.config = resuming.run_config(model, optimizer, schedule, loss=loss, seed=setup.seed, batch_size=batch_size,
                                         clip_norm=clip_norm, eval_every=eval_every,  # as given: None, epoch ends
                                         accumulate=accumulate, precision=run.precision,
                                         early_stopping=early_stopping, extra=_with_weights(run_config, loss_weights),
                                         data=resuming.data_fingerprint(data, val) if out is not None else None)
        if setup.resume:
            run.history, run.state = resuming.restore(out, model, optimizer, schedule, config=run.config, log=log,
                                                      samples=len(data), allow_data_change=setup.allow_data_change,
                                                      loss_scale=run.scaler)
            run.restore_callbacks(log)
            if run.done():
                log(f"resume: the run is already at step {run.state.step}, which reaches the {run.length()} asked "
                    "for; nothing to train (ask for more steps or epochs)")
        with precisions.using(run.precision), loss_scale.attached(run):
            run.train(interrupted)
        history = run.finish(restore_best)
        setup.world.barrier()  # no rank returns (and reads the folder) before rank 0 has written it
        if not setup.writes:  # rank 0 saved the best model: every rank ends with it, as rank 0 does
            run.restore_best(out, restore_best)
        return history


def _check_setup(setup, model, out_dir, resume, overwrite, seed, allow_data_change) -> None:
    """A RunSetup given to fit decides the folder, resume, overwrite and seed: refuse them given twice,
    and a model on another device than the setup's."""
    if not isinstance(setup, RunSetup):
        raise TypeError(f"fit: setup must be a gpunet.training.setup.RunSetup, got {_name(setup)}")
    given = [name for name, value, default in (("out_dir", out_dir, None), ("resume", resume, False),
                                               ("overwrite", overwrite, False), ("seed", seed, 0),
                                               ("allow_data_change", allow_data_change, False)) if value != default]
    if given:
        raise ValueError(f"fit: setup= decides the run's folder, resume, overwrite, seed and allow_data_change; "
                         f"give {', '.join(given)} to the RunSetup, not to fit as well")
    if model.device != setup.device.name:
        raise ValueError(f"fit: the model is on the {model.device} and the setup trains on the {setup.device.name}; "
                         f"move it there first (model.to(setup.device))")


def _quiet(*args, **kwargs) -> None:
    pass


def _with_weights(run_config: dict | None, loss_weights) -> dict:
    """The caller's run config, with loss_weights when given (a resume compares them too)."""
    return {**(run_config or {}), **({"loss_weights": loss_weights} if loss_weights is not None else {})}


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


def _check_model(model, where: str) -> None:
    if not isinstance(model, Layer):
        raise TypeError(f"{where}: model must be a gpunet layer or model (gn.Sequential(...), gn.models.mlp(...)), "
                        f"got {type(model).__name__}")


def _check_optimizer(model, optimizer) -> None:
    """Refuse an optimizer that would not update exactly this model's parameters: one made with another
    model (a notebook that rebuilt the model) or with a part of it trains nothing, or only that part,
    and says nothing. Which arrays it updates is what counts: it steps the parameters of its .model."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"fit: optimizer must be a gpunet optimizer made with the model (gn.optim.SGD(model, lr), "
                        f"gn.optim.Adam(model), gn.optim.AdamW(model)), got {_name(optimizer)}")
    own = {id(a): name for name, a in model.params.items()}
    theirs = {id(a): name for name, a in optimizer.model.params.items()}
    if own.keys() == theirs.keys():
        optimizer.check_trains()  # (every parameter frozen: it would train nothing)
        return
    name, shared = type(optimizer).__name__, [own[i] for i in own if i in theirs]
    if shared and len(shared) == len(theirs):
        left = [own[i] for i in own if i not in theirs]
        what = (f"was made with a part of the model being fitted: it updates {len(shared)} of its {len(own)} parameters "
                f"({_names(shared)}), so {len(left)} ({_names(left)}) would never train")
    else:
        what = (f"was made with another model: it updates {len(theirs)} parameters ({_names(theirs.values())}) "
                f"of a {type(optimizer.model).__name__}, and {'only ' + str(len(shared)) if shared else 'none'} of "
                f"them belong to the {type(model).__name__} being fitted ({len(own)} parameters: {_names(own.values())})")
    raise ValueError(f"fit: the optimizer ({name}) {what}; make it with the model you fit, gn.optim.{name}(model, ...); "
                     "to train only a part, make it with the whole model and freeze the rest (layer.freeze()), "
                     'or give that part its own learning rate with parameter groups (groups={pattern: {"lr": ...}})')


def _name(value) -> str:
    return value.__name__ if isinstance(value, type) else type(value).__name__


def _names(names, shown: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def _data(model, train, val, loss):
    """The training data as an object with __len__ and get; val as (x, y) arrays or an object with evaluate.
    Lists become arrays (gpunet.layers.inputs); then empty sets, NaN/Inf and images outside the model's
    pixel range are refused before any work."""
    if isinstance(train, tuple):
        if len(train) != 2:
            raise ValueError(f"fit: train must be (x, y), got a tuple of {len(train)} item{'' if len(train) == 1 else 's'}")
        data = ArrayData(arrays.inputs(model, train[0], "training data"),
                         arrays.targets(model, train[1], "training data", loss))
    elif hasattr(train, "get") and hasattr(train, "__len__"):
        data = train
    else:
        raise TypeError(f"fit: train must be a tuple (x, y) of arrays or lists, or an object with __len__ and "
                        f"get(indices, rng), got {_name(train)}")
    if isinstance(val, tuple):
        if len(val) != 2:
            raise ValueError(f"fit: val must be (x_val, y_val), got a tuple of {len(val)} item{'' if len(val) == 1 else 's'}")
        val = (arrays.inputs(model, val[0], "validation data"), arrays.targets(model, val[1], "validation data", loss))
    elif val is not None and not hasattr(val, "evaluate"):
        raise TypeError(f"fit: val must be a tuple (x_val, y_val) of arrays or lists, or an object with "
                        f"evaluate(model, loss), got {_name(val)}")
    _check_data(model, data, val, loss)
    return data, val


def _check_data(model, data, val, loss) -> None:
    """Refuse empty sets, NaN/Inf, images outside the model's pixel range and fractional class labels
    before any work."""
    validate.not_empty(len(data), "training data")
    if isinstance(data, ArrayData):
        _check_arrays(model, data.x, data.y, loss, "training data", finite=False)  # (ArrayData checked them)
    if isinstance(val, tuple):
        x, y = val
        if arrays.samples(x) != arrays.samples(y):
            raise ValueError(f"validation data: {arrays.samples(x)} inputs but {arrays.samples(y)} targets")
        validate.not_empty(arrays.samples(x), "validation data")
        _check_arrays(model, x, y, loss, "validation data")


def _check_arrays(model, x, y, loss, where: str, finite: bool = True) -> None:
    """Each input array finite and within its preprocessing's pixel range, each target array finite and of
    class ids where its loss implies accuracy (several inputs, outputs: each with its own spec and loss)."""
    inputs, specs = (x, model.preprocess) if isinstance(x, list) else ([x], [model.preprocess])
    for i, (a, spec) in enumerate(zip(inputs, specs if isinstance(specs, list) else [None] * len(inputs))):
        if isinstance(a, numpy.ndarray):
            named = where if len(inputs) == 1 else f"{where}: input {i}"
            if finite:
                validate.finite_array(a, named)
            validate.images(a, spec, named if len(inputs) > 1 else ("evaluate: images" if where == "evaluate" else where))
    targets, names = (y, loss) if isinstance(loss, (list, tuple)) else ([y], [loss])
    for i, (t, name) in enumerate(zip(targets, names)):
        if isinstance(t, numpy.ndarray):
            named = where if len(targets) == 1 else f"{where}: targets {i}"
            if finite:
                validate.finite_array(t, named, "targets")
            _class_ids(t, name, named)


def _class_ids(y, loss: str, where: str) -> None:
    """A loss that implies accuracy (softmax_cross_entropy) takes class ids, or probabilities with a class
    axis: float labels of one number per sample are neither (the loss would say only that the shapes differ)."""
    if metric(loss) == "accuracy" and isinstance(y, numpy.ndarray) and y.ndim == 1 and y.dtype.kind == "f":
        whole = bool((y == numpy.round(y)).all())
        raise ValueError(f"{where}: softmax_cross_entropy takes integer class ids, got {y.dtype} labels"
                         + ("; convert them with y.astype('int64')" if whole else
                            f" with fractions ({y[numpy.argmax(y != numpy.round(y))]} at index "
                            f"{int(numpy.argmax(y != numpy.round(y)))})"))


def _graphed_step(run, log):
    """The GraphedStep that replays run's step, or None (with one line from log) when it cannot."""
    reason = cuda_graph.why_not(run.model, run.optimizer, run.parallel.world_size)
    if reason is not None:
        log(f"cuda graph: off, training eagerly: {reason}")
        return None
    if run.accumulate > 1:  # a graph per batch shape of the batches' work, and one of the update
        return cuda_graph.GraphedStep(run._micro_step, run.optimizer, log, update=run._update_step)
    return cuda_graph.GraphedStep(run._device_step, run.optimizer, log)
