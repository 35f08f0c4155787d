"""One trial of a search: the recipe's run with the trial's parameters, trained by gn.fit into an
ordinary run folder, selected on a split carved from the training part.

The search never sees the split that `gpunet train` validates on (images: the random
val_fraction; text: the last val_fraction of the characters), nor held-out images: it trains on
the rest of the training part and selects on its last (text) or a random (images) val_fraction.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy

import gpunet as gn
from gpunet.training.callbacks import Callback
from gpunet.training.runs import holds_run
from gpunet.data import CharWindows, consecutive_windows, image_preprocess, load_dataset, split, text_preprocess
from gpunet.training.train import ArrayData

EVALUATIONS = 10  # per trial of a run measured in steps: the points at which the pruner compares trials


@dataclass
class SearchData:
    """What every trial trains on and selects on, loaded once."""
    num_classes: int
    train: object  # a gn.fit training source
    select: tuple  # (inputs, targets): the selection split
    preprocess: dict
    description: str


def load(recipe, dataset: str, data_dir, download: bool, val_fraction: float, seed: int, holdout: int) -> SearchData:
    ds = load_dataset(dataset, data_dir, download, val_fraction, seed, holdout)
    if recipe.kind == "text":
        cut = int(len(ds.train) * (1.0 - val_fraction))
        train = CharWindows(ds.train[:cut], recipe.context)
        select = consecutive_windows(ds.train[cut:], recipe.context)
        note = (f"{cut} training characters, the next {len(ds.train) - cut} select; the last {len(ds.val)} "
                "(the validation text) stay out")
        return SearchData(ds.num_classes, train, select, text_preprocess(ds.vocabulary), note)
    x, y, x_select, y_select = split(ds.x_train, ds.y_train, val_fraction, seed)
    note = (f"{len(x)} training images, {len(x_select)} select; the {len(ds.x_val)} validation images"
            + (f" and the {len(ds.x_holdout)} held out" if ds.x_holdout is not None else "") + " stay out")
    return SearchData(ds.num_classes, ArrayData(x, y, shift=recipe.shift), (x_select, y_select),
                      image_preprocess(x, recipe.input_shape), note)


class _Pruning(Callback):
    """Reports each evaluation's validation loss to the Optuna trial; stops the run when the pruner says."""

    def __init__(self, trial):
        self.trial, self.evaluations, self.pruned = trial, 0, False

    def on_evaluation(self, record: dict) -> bool:
        self.evaluations += 1
        self.trial.report(float(record["val_loss"]), self.evaluations)
        self.pruned = self.trial.should_prune()
        return self.pruned


@dataclass
class Outcome:
    state: str  # "complete", "pruned" or "diverged"
    val_loss: float | None  # the lowest selection loss of the run
    val_accuracy: float | None  # at that evaluation
    best_step: int | None
    steps: int
    seconds: float


def run(recipe, data: SearchData, params: dict, trial, *, epochs, steps, device, seed: int, out, log,
        precision: str = "fp32") -> Outcome:
    """Train one trial into the run folder out (an interrupted earlier attempt there is moved aside)."""
    started = time.perf_counter()
    gn.manual_seed(seed)
    model = recipe.build(data, **{k: v for k, v in params.items() if k in recipe.arch})
    model.preprocess = data.preprocess
    model.to(device)
    optimizer = recipe.make_optimizer(model, lr=params.get("lr"), weight_decay=params.get("weight_decay"),
                                      momentum=params.get("momentum"))
    batch = int(params.get("batch_size", recipe.batch_size))
    total = steps or epochs * -(-len(data.train) // batch)
    schedule = recipe.make_schedule(optimizer, total, params.get("warmup"))
    pruning = _Pruning(trial)
    train = data.train
    if "shift" in params:  # the images are loaded once per search: a trial with its own shift gets its own view
        train = copy.copy(train)
        train.shift = int(params["shift"])
    try:
        with numpy.errstate(all="ignore"):  # a diverging trial is reported by fit, not by NumPy warnings
            history = gn.fit(model, train, data.select, optimizer=optimizer, epochs=epochs, steps=steps,
                             batch_size=batch, eval_every=max(1, steps // EVALUATIONS) if steps else None,
                             schedule=schedule, clip_norm=recipe.clip_norm, out_dir=out, seed=seed, progress=False,
                             overwrite=bool(holds_run(out)),  # an interrupted attempt: moved aside, not lost
                             log=log, callbacks=[pruning], run_config={"search_params": params}, precision=precision)
    except gn.train.TrainingDiverged as exc:
        log(f"  diverged: {exc}")
        return Outcome("diverged", None, None, None, 0, round(time.perf_counter() - started, 1))
    best = next((r for r in history.records if r["step"] == history.best_step), None)
    return Outcome("pruned" if pruning.pruned else "complete", best and best["val_loss"],
                   best and best.get("val_accuracy"), history.best_step, history.last().get("step", 0),
                   round(time.perf_counter() - started, 1))
