"""Search spaces: the default one per model, a JSON or TOML file that replaces it, and drawing a
trial's parameters from it with Optuna's suggest_* calls.

A space maps a parameter name to a range, a list of choices, or one fixed value:

    {"lr": {"low": 1e-4, "high": 1e-2, "log": true},   # float range (log-uniform with "log")
     "hidden1": {"low": 128, "high": 1024, "log": true}, # integer range: the parameter is a whole number
     "batch_size": {"choices": [64, 128, 256]},
     "dropout": 0.1}                                     # fixed

The names are the training settings of TRAINING (all models), IMAGE_TRAINING (image models: random
shifts) and the model's own shape settings (the recipe's `arch`: widths, dropout). A parameter the
space leaves out keeps the recipe's value. Every value a space can give (a fixed value, each choice,
both ends of a range) is checked against what the optimizer, the layer or the data accepts (LIMITS)
when the space is read, before a search writes anything.
"""
from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

from gpunet import validate

# name -> (kind, meaning); the recipe's arch adds its own names, their kind from the default value
TRAINING = {
    "lr": (float, "learning rate"),
    "batch_size": (int, "samples per optimizer step"),
    "weight_decay": (float, "the optimizer's weight decay"),
    "warmup": (float, "fraction of the run's optimizer steps that warm the rate up linearly"),
    "momentum": (float, "SGD's momentum (with --optimizer sgd)"),
}
IMAGE_TRAINING = {"shift": (int, "random image shifts of up to this many pixels")}

# What each parameter accepts: (lowest, highest, lowest excluded, highest excluded, how it is said).
# The optimizers take a positive lr and a non-negative weight decay; Dropout a rate in [0, 1); the
# warm-up is a fraction of the run; shifts move 28x28 images; widths and layer counts are capped
# where a trial would need gigabytes (MAX_SIZE), so that a typo fails here, not in a trial.
MAX_SIZE = 16384
MAX_BATCH = 65536
MAX_LAYERS = 64
MAX_SHIFT = 27
LIMITS = {
    "lr": (0, None, True, False, "a positive learning rate"),
    "batch_size": (1, MAX_BATCH, False, False, f"a batch size from 1 to {MAX_BATCH}"),
    "weight_decay": (0, None, False, False, "a weight decay of at least 0"),
    "warmup": (0, 1, False, False, "a fraction of the run from 0 to 1"),
    "momentum": (0, 1, False, True, "a momentum in [0, 1)"),
    "shift": (0, MAX_SHIFT, False, False, f"a shift from 0 to {MAX_SHIFT} pixels"),
    "dropout": (0, 1, False, True, "a dropout rate in [0, 1)"),
    "num_layers": (1, MAX_LAYERS, False, False, f"a number of layers from 1 to {MAX_LAYERS}"),
}
SIZE_LIMIT = (1, MAX_SIZE, False, False, f"a size from 1 to {MAX_SIZE}")  # the other (integer) shape settings
# The transformer recipe has 4 attention heads, so its d_model must split evenly among them.
MULTIPLE_OF = {"d_model": 4}

_COMMON = {"lr": {"low": 3e-4, "high": 1e-2, "log": True}, "batch_size": {"choices": [32, 64, 128, 256]},
           "weight_decay": {"low": 1e-6, "high": 1e-3, "log": True}, "warmup": {"low": 0.0, "high": 0.1}}
_TEXT = {**_COMMON, "batch_size": {"choices": [16, 32, 64]}}

DEFAULT_SPACES = {
    "mlp": {**_COMMON, "hidden1": {"low": 128, "high": 1024, "log": True},
            "hidden2": {"low": 32, "high": 512, "log": True}, "dropout": {"low": 0.0, "high": 0.5}},
    "cnn": {**_COMMON, "batch_size": {"choices": [32, 64, 128]}, "width": {"low": 4, "high": 16},
            "dropout": {"low": 0.0, "high": 0.5}},
    "rnn": {**_TEXT, "embedding_dim": {"low": 16, "high": 128, "log": True},
            "hidden_size": {"low": 128, "high": 512, "log": True}, "dropout": {"low": 0.0, "high": 0.3}},
    "transformer": {**_TEXT, "d_model": {"choices": [64, 128, 192, 256]}, "num_layers": {"low": 1, "high": 4},
                    "dropout": {"low": 0.0, "high": 0.2}},
}


def kinds(recipe) -> dict:
    """Every name a space may hold for this recipe -> int or float."""
    training = {**TRAINING, **(IMAGE_TRAINING if recipe.kind == "image" else {})}
    return {**{name: kind for name, (kind, _) in training.items()},
            **{name: type(value) for name, value in recipe.arch.items()}}


def default_space(model: str, recipe) -> dict:
    return check(DEFAULT_SPACES[model], recipe, f"the default space of {model}")


def load_space(path, recipe, model: str) -> dict:
    """A space file (.json or .toml), checked; every error is one line naming the file and the key."""
    path = Path(path)
    validate.not_special_file(path, "space file")  # /dev/zero or a FIFO: reading would never end or never start
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        raw = tomllib.loads(text.decode("utf-8")) if path.suffix.lower() == ".toml" else json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError and TOMLDecodeError are
        # ValueErrors; RecursionError: lists nested thousands deep
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ValueError(f"space file {path}: not valid {kind} ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"space file {path}: expected a table of parameter name -> range, choices or value")
    return check(raw, recipe, f"space file {path}", model)


def check(raw: dict, recipe, where: str, model: str = "") -> dict:
    """raw with every entry checked against the parameter's kind; returns {name: entry}."""
    known = kinds(recipe)
    space = {}
    for name, entry in raw.items():
        if name not in known:
            raise ValueError(f"{where}: unknown parameter {name!r} for --model {model or '?'} "
                             f"(known: {', '.join(known)})")
        space[name] = _check_entry(entry, name, known[name], f"{where}: {name!r}")
    return space


def _limits(name: str, kind) -> tuple:
    return LIMITS.get(name) or (SIZE_LIMIT if kind is int else (0, None, False, False, "a number of at least 0"))


def _check_entry(entry, name: str, kind, where: str):
    if _is_number(entry):
        _check_value(entry, name, kind, where)
        return entry
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a number, {{\"low\", \"high\"[, \"log\"]}} or {{\"choices\"}}, "
                         f"got {entry!r}")
    keys = set(entry)
    if keys == {"choices"}:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}")
        for value in choices:
            _check_value(value, name, kind, where)
        return {"choices": list(choices)}
    if keys not in ({"low", "high"}, {"low", "high", "log"}):
        raise ValueError(f"{where}: expected the keys low, high and optional log, or choices; "
                         f"got {', '.join(sorted(map(str, keys)))}")
    low, high, log = entry["low"], entry["high"], entry.get("log", False)
    for value in (low, high):
        _check_number(value, kind, where)
    if name in MULTIPLE_OF:
        raise ValueError(f"{where}: a range would draw values that are not multiples of {MULTIPLE_OF[name]}; "
                         "give choices or a fixed value")
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log must be true or false, got {log!r}")
    if not low < high:
        raise ValueError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low}")
    for value in (low, high):
        _check_value(value, name, kind, where)
    return {"low": kind(low), "high": kind(high), "log": log}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(value, kind, where: str) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"{where}: must be a whole number, got {value!r}")


def _check_value(value, name: str, kind, where: str) -> None:
    """A value the parameter can take: a number of its kind, within its LIMITS."""
    _check_number(value, kind, where)
    low, high, low_open, high_open, said = _limits(name, kind)
    if (value <= low if low_open else value < low) or (high is not None and (value >= high if high_open
                                                                              else value > high)):
        raise ValueError(f"{where}: must be {said}, got {value!r}")
    if name in MULTIPLE_OF and value % MULTIPLE_OF[name]:
        raise ValueError(f"{where}: must be a multiple of {MULTIPLE_OF[name]} (the attention heads), got {value!r}")


def suggest(trial, space: dict) -> dict:
    """The trial's parameters, drawn in the space's order (so a seeded sampler repeats them)."""
    params = {}
    for name, entry in space.items():
        if not isinstance(entry, dict):
            params[name] = entry
        elif "choices" in entry:
            params[name] = trial.suggest_categorical(name, entry["choices"])
        elif isinstance(entry["low"], int):
            params[name] = trial.suggest_int(name, entry["low"], entry["high"], log=entry["log"])
        else:
            params[name] = trial.suggest_float(name, entry["low"], entry["high"], log=entry["log"])
    return params


def describe(space: dict) -> str:
    """One line per parameter, for the search's first lines of output."""
    def one(entry):
        if not isinstance(entry, dict):
            return f"fixed {entry}"
        if "choices" in entry:
            return "one of " + ", ".join(str(c) for c in entry["choices"])
        return f"{entry['low']} to {entry['high']}" + (" (log-uniform)" if entry["log"] else "")
    return "; ".join(f"{name} {one(entry)}" for name, entry in space.items())
