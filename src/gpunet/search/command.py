"""`gpunet search`: its flags (add_parser, called by gpunet.cli) and the command (run)."""
from __future__ import annotations

import dataclasses

import gpunet as gn
from gpunet.backend.precision import PRECISIONS
from gpunet import errors, validate
from gpunet.data import DATASETS, TEXT_DATASETS
from gpunet.recipes import RECIPES, recipe

SPACE_HELP = ("JSON or TOML file: parameter -> {low, high[, log]}, {choices} or a fixed value; it replaces the "
              "model's default space (see README: Hyper-parameter search)")


def add_parser(sub, device_option: dict) -> None:
    """The `search` subcommand's flags; device_option: the --device of the other commands."""
    s = sub.add_parser("search", help="hyper-parameter search (Optuna): one run folder per trial, the best kept")
    s.add_argument("--model", default="mlp", choices=sorted(RECIPES))
    s.add_argument("--trials", type=validate.cli_positive_int, required=True)
    length = s.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=validate.cli_positive_int, default=None)
    length.add_argument("--steps", type=validate.cli_positive_int, default=None, help="optimizer steps per trial")
    s.add_argument("--space", default=None, metavar="FILE", help=SPACE_HELP)
    s.add_argument("--optimizer", choices=sorted(gn.optim.OPTIMIZERS), default=None,
                   help="every trial's optimizer (default: the model's recipe's); a space's momentum needs sgd")
    s.add_argument("--sampler", choices=["random", "tpe"], default="random",
                   help="random search (default), or Optuna's TPE")
    s.add_argument("--pruner", choices=["median", "none"], default="median",
                   help="stop a trial whose validation loss is worse than the median of earlier trials at the "
                        "same evaluation (default: median)")
    s.add_argument("--dataset", default=None, choices=DATASETS)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--download", action="store_true")
    s.add_argument("--device", **device_option)
    s.add_argument("--seed", type=validate.cli_seed, default=0)
    s.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="every trial's training precision: fp32 (default), or bf16 | fp16 (docs/precision.md)")
    s.add_argument("--val-fraction", type=validate.cli_fraction, default=0.1,
                   help="as gpunet train's; the search selects on the same fraction of what is left for training")
    s.add_argument("--holdout", type=validate.cli_non_negative_int, default=0, metavar="N",
                   help="keep the last N images out of the search altogether (as gpunet train --holdout)")
    s.add_argument("--out", required=True, help="the search folder; the same command again resumes it")


def run(args) -> int:
    from gpunet.search import space as spaces, study

    study.optuna_module()  # its absence is said before any other work
    r = recipe(args.model)
    if args.optimizer and args.optimizer != r.optimizer:  # the recipe's momentum went with its own optimizer
        r = dataclasses.replace(r, optimizer=args.optimizer, momentum=None)
    dataset = args.dataset or r.dataset
    if (dataset in TEXT_DATASETS) != (r.kind == "text"):
        raise errors.UsageError(f"--model {args.model} cannot train on --dataset {dataset}")
    space = spaces.load_space(args.space, r, args.model) if args.space else None
    try:
        dev = gn.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"gpunet search: {exc}") from None
    print(f"device: {dev.name} ({dev.reason})")
    rows = study.search(r, args.model, args.trials, args.out, epochs=args.epochs, steps=args.steps, space=space,
                        device=dev, seed=args.seed, sampler=args.sampler, pruner=args.pruner, dataset=dataset,
                        data_dir=args.data_dir, download=args.download, val_fraction=args.val_fraction,
                        holdout=args.holdout, precision=args.precision)
    from gpunet.search.report import best

    top = best(rows)
    if top is None:
        print(f"no trial completed; {args.out}/trials.csv lists them")
        return 1
    print(f"best: trial {top['trial']}, val_loss {top['val_loss']:.4f}"
          + (f", val_accuracy {top['val_accuracy']:.4f}" if top.get("val_accuracy") is not None else "")
          + f"; wrote {args.out}/trials.csv and {args.out}/best/ (model.safetensors, history.json, trial.json)")
    return 0
