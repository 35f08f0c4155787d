"""The search loop: an Optuna study in DIR/study.db (SQLite), one ordinary run folder per trial
under DIR/trials/, and DIR/trials.csv, DIR/best/ and DIR/trials.png rewritten after every trial.

Trials are numbered 0..N-1 by the search. Trial k draws its parameters with a sampler seeded by
(seed, k), so the same seed gives the same trials, resumed or not (TPE also reads the finished
trials, which are the same ones). Running the same command again resumes: finished trials
(complete, pruned, diverged) are kept, and a trial that was interrupted is run again from its start.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy

import gpunet as gn
from gpunet.training import resume, runs
from gpunet.search import report, space as spaces, trial as trial_run

STUDY_NAME = "gpunet-search"
SAMPLERS = ("random", "tpe")
PRUNERS = ("median", "none")


class MissingOptuna(ImportError):
    """gpunet search needs the optional Optuna."""


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise MissingOptuna("the search needs Optuna, which is not installed: pip install 'gpunet[search]'") from None
    return optuna


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial `number`'s sampler: a function of (seed, number) only."""
    return int(numpy.random.SeedSequence([seed, number]).generate_state(1)[0])


def search(recipe, model: str, trials: int, out, *, epochs=None, steps=None, space=None, device=None,
           seed: int = 0, sampler: str = "random", pruner: str = "median", dataset=None, data_dir=None,
           download: bool = False, val_fraction: float = 0.1, holdout: int = 0, precision: str = "fp32",
           log=print) -> list[dict]:
    """Run (or resume) the search; returns the rows of trials.csv. space: a checked space (see
    gpunet.search.space), None for the model's default; device: a gn.device; log: one line per trial."""
    optuna = optuna_module()
    device = device or gn.device("auto")
    if sampler not in SAMPLERS or pruner not in PRUNERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} and pruner one of {PRUNERS}, got {sampler!r}, {pruner!r}")
    # a space from Python is checked as a space file is (the CLI's is checked already: the same again)
    space = spaces.check(space, recipe, "space", model) if space is not None else spaces.default_space(model, recipe)
    if "momentum" in space and recipe.optimizer != "sgd":
        raise ValueError(f"space: momentum is a setting of the sgd optimizer, not of {recipe.optimizer} "
                         "(gpunet search --optimizer sgd)")
    dataset = dataset or recipe.dataset
    steps = steps if steps or epochs else recipe.steps
    epochs = None if steps else (epochs or recipe.epochs)
    out = Path(out)
    runs.check_out_folder(out)
    made = not out.exists()  # removed again if the search fails while it is still empty
    settings = {"model": model, "dataset": dataset, "epochs": epochs, "steps": steps, "seed": seed,
                "sampler": sampler, "pruner": pruner, "val_fraction": val_fraction, "holdout": holdout,
                "space": space,
                **({"optimizer": recipe.optimizer} if recipe.optimizer != "adam" else {}),  # (saved before: adam)
                **({"precision": precision} if precision != "fp32" else {})}  # (searches saved before: fp32)
    try:
        # Locked before anything else is looked at or written: a second search started while the first
        # has not yet made its study.db is refused as "in use", not as a folder of strangers' files.
        with runs.RunLock(out):  # one search at a time in a folder
            if any(p.name != runs.LOCK_NAME for p in out.iterdir()) and not (out / "study.db").exists():
                raise FileExistsError(f"--out {out} holds files but no search (no study.db); choose a new or "
                                      "empty folder")
            # the data before the study: a search that cannot load its data leaves no study.db behind
            data = trial_run.load(recipe, dataset, data_dir, download, val_fraction, seed, holdout)
            return _run(optuna, recipe, model, trials, out, data, space, settings, device, log)
    finally:
        if made:
            try:
                out.rmdir()  # only while empty: a search that wrote anything keeps its folder
            except OSError:
                pass


def _run(optuna, recipe, model, trials, out, data, space, settings, device, log) -> list[dict]:
    """The search proper, in the locked folder out."""
    steps, epochs, seed = settings["steps"], settings["epochs"], settings["seed"]
    sampler, pruner, dataset = settings["sampler"], settings["pruner"], settings["dataset"]
    optuna.logging.set_verbosity(logging.WARNING)  # the search prints its own line per trial
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{out.resolve() / 'study.db'}",
                                direction="minimize", load_if_exists=True,
                                pruner=_pruner(optuna, pruner, epochs or trial_run.EVALUATIONS))
    _check_settings(study, settings, out)
    _fail_interrupted(study, optuna)
    log(f"search: {model} on {dataset}, {trials} trials of {f'{steps} steps' if steps else f'{epochs} epochs'}, "
        f"{sampler} sampler, {pruner} pruner, seed {seed}; {data.description}")
    log(f"space: {spaces.describe(space)}")
    if not report.can_plot():
        log("no trials.png: matplotlib is not installed (pip install 'gpunet[plot]')")
    done = finished(study, optuna)
    for number in range(trials):
        if number in done:
            continue
        study.sampler = _sampler(optuna, sampler, trial_seed(seed, number))
        trial = study.ask()
        trial.set_user_attr("trial", number)
        params = spaces.suggest(trial, space)
        folder = out / "trials" / f"trial-{number:03d}"
        try:
            outcome = trial_run.run(recipe, data, params, trial, epochs=epochs, steps=steps, device=device,
                                    seed=seed, out=folder, log=lambda line, n=number: log(f"  trial {n}: {line}"),
                                    precision=settings.get("precision", "fp32"))
        except KeyboardInterrupt as stopped:  # Ctrl-C, SIGTERM or SIGHUP: the same signal ends the command
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise resume.interruption(stopped, f" in trial {number}; run the same command again to resume the "
                                      f"search (trial {number} starts over)") from None
        except BaseException:  # an error: the trial stays unfinished, and runs again next time
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        _tell(study, trial, outcome, optuna)
        rows = report.write(out, finished(study, optuna), space, classifier=recipe.kind != "text")
        log(report.progress_line(number, trials, params, outcome, rows))
    rows = report.write(out, finished(study, optuna), space, classifier=recipe.kind != "text")
    return rows


def finished(study, optuna) -> dict:
    """Search trial number -> the Optuna trial that finished it (complete, pruned, or diverged)."""
    states = optuna.trial.TrialState
    done = {}
    for t in study.get_trials(deepcopy=False):
        ended = t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and t.user_attrs.get("diverged"))
        if ended and "trial" in t.user_attrs:
            done[t.user_attrs["trial"]] = t
    return done


def _tell(study, trial, outcome, optuna) -> None:
    for key in ("val_accuracy", "best_step", "steps", "seconds"):
        trial.set_user_attr(key, getattr(outcome, key))
    trial.set_user_attr("val_loss", outcome.val_loss)
    states = optuna.trial.TrialState
    if outcome.state == "complete":
        study.tell(trial, outcome.val_loss)
    elif outcome.state == "pruned":
        study.tell(trial, state=states.PRUNED)
    else:
        trial.set_user_attr("diverged", True)  # finished: a resume does not run it again
        study.tell(trial, state=states.FAIL)


def _sampler(optuna, kind: str, seed: int):
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(optuna, kind: str, evaluations: int):
    if kind == "none":
        return optuna.pruners.NopPruner()
    # Optuna's steps are our evaluations, counted from 1. Early on, a warm-up or a low rate looks worse
    # than it ends: compare from a third of the run on, once 4 trials have finished.
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(2, evaluations // 3))


def _check_settings(study, settings: dict, out: Path) -> None:
    """A resumed search must be the same search (more trials are fine): the others are refused, listed."""
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
        return
    changed = [f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in {**saved, **settings}  # a setting said
               if saved.get(k) != settings.get(k)]                               # only when not the default too
    if changed:
        raise ValueError(f"{out} holds a search with other settings ({'; '.join(changed)}); run it with its own "
                         "settings to resume it, or choose another --out")


def _fail_interrupted(study, optuna) -> None:
    """Trials left running by a search that died (the folder lock says none is alive) end as failed;
    their numbers run again."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
