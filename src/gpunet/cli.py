"""The command line: gpunet train | eval | info (also `python -m gpunet`)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy

import gpunet as gn
from gpunet.backend import device_info
from gpunet.data import image_preprocess, load_dataset, read_idx
from gpunet.recipes import RECIPES, recipe
from gpunet.summary import summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpunet", description="Train and evaluate gpunet models.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and save it with its history")
    t.add_argument("--model", default="mlp", choices=sorted(RECIPES))
    t.add_argument("--dataset", default="mnist-sample", choices=gn.data.DATASETS)
    t.add_argument("--data-dir", default=None, help="where downloaded datasets are cached (default $GPUNET_DATA or ~/.cache/gpunet)")
    t.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, default=None)
    length.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps instead of epochs")
    t.add_argument("--batch-size", type=_positive_int, default=None)
    t.add_argument("--lr", type=_positive_float, default=None)
    t.add_argument("--optimizer", choices=sorted(gn.optim.OPTIMIZERS), default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--early-stopping", type=_positive_int, default=None, metavar="EVALS",
                   help="stop after this many evaluations without a better validation loss")
    t.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a saved model on IDX images and labels")
    e.add_argument("checkpoint")
    e.add_argument("--images", required=True)
    e.add_argument("--labels", required=True)
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    e.add_argument("--batch-size", type=_positive_int, default=1000)

    sub.add_parser("info", help="versions, devices and why a GPU is (un)usable")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "eval": cmd_eval, "info": cmd_info}[args.command](args)


def cmd_train(args) -> int:
    r = recipe(args.model)
    gn.manual_seed(args.seed)
    dev = gn.device(args.device)
    print(f"device: {dev.name} ({dev.reason})")
    ds = load_dataset(args.dataset, args.data_dir, args.download, args.val_fraction, args.seed)
    model = r.build(ds)
    model.preprocess = image_preprocess(ds.x_train, r.input_shape)
    model.to(dev)
    print(summary(model, r.input_shape))
    epochs = args.epochs if args.steps is None else None
    if epochs is None and args.steps is None:
        epochs = r.epochs
    optimizer = gn.optim.OPTIMIZERS[args.optimizer or r.optimizer](model, lr=args.lr or r.lr)
    batch = args.batch_size or r.batch_size
    evals = epochs if epochs else max(1, min(20, args.steps // max(1, len(ds.x_train) // batch)))
    schedule = gn.optim.CosineLR(optimizer, t_max=evals) if r.schedule == "cosine" else None
    print(f"training {args.model} on {ds.name}: {len(ds.x_train)} train / {len(ds.x_val)} validation samples, "
          f"{'%d epochs' % epochs if epochs else '%d steps' % args.steps}, batch {batch}, "
          f"{type(optimizer).__name__} lr {optimizer.lr}")
    out = Path(args.out)
    history = gn.fit(model, gn.train.ArrayData(ds.x_train, ds.y_train, shift=r.shift), (ds.x_val, ds.y_val),
                     optimizer=optimizer, epochs=epochs, steps=args.steps, batch_size=batch,
                     eval_every=None if epochs else max(1, args.steps // evals), schedule=schedule,
                     clip_norm=r.clip_norm, early_stopping=args.early_stopping, out_dir=out,
                     resume=args.resume, seed=args.seed, progress=False if args.no_progress else None)
    best = min(history.records, key=lambda rec: rec["val_loss"])
    last = history.last()
    print(f"final: train_loss {last['train_loss']:.4f}  val_loss {last['val_loss']:.4f}  "
          f"val_accuracy {last.get('val_accuracy', float('nan')):.4f}")
    print(f"best (saved): step {best['step']}  val_loss {best['val_loss']:.4f}  "
          f"val_accuracy {best.get('val_accuracy', float('nan')):.4f}")
    print(f"wrote {out / 'model.safetensors'}, {out / 'last.safetensors'}, {out / 'history.json'}, "
          f"{out / 'metrics.csv'}, {out / 'history.png'}")
    return 0


def cmd_eval(args) -> int:
    model = gn.load(args.checkpoint)
    dev = gn.device(args.device)
    model.to(dev)
    images, labels = read_idx(args.images), read_idx(args.labels)
    if len(images) != len(labels):
        raise SystemExit(f"gpunet eval: {args.images} has {len(images)} images but {args.labels} has {len(labels)} labels")
    result = gn.evaluate(model, images, labels.astype("int64"), batch_size=args.batch_size)
    print(f"device: {dev.name}; model: {args.checkpoint}")
    print(json.dumps({"accuracy": round(result["accuracy"], 6), "loss": round(result["loss"], 6),
                      "samples": result["samples"]}))
    return 0


def cmd_info(args) -> int:
    import numba

    print(f"gpunet {gn.__version__}; Python {platform.python_version()}; NumPy {numpy.__version__}; Numba {numba.__version__}")
    for line in device_info():
        print(line)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value



if __name__ == "__main__":
    sys.exit(main())
