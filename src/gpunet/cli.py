"""The command line: gpunet train | eval | generate | bench | parity | info (also `python -m gpunet`)."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy

import gpunet as gn
from gpunet.backend import device_info
from gpunet.data import (TEXT_DATASETS, CharWindows, consecutive_windows, image_preprocess, load_dataset, read_idx,
                         text_preprocess)
from gpunet.generate import generate
from gpunet.recipes import RECIPES, recipe
from gpunet.summary import summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpunet", description="Train and evaluate gpunet models.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and save it with its history")
    t.add_argument("--model", default="mlp", choices=sorted(RECIPES))
    t.add_argument("--dataset", default=None, choices=gn.data.DATASETS,
                   help="default: mnist-sample for mlp and cnn, shakespeare for rnn and transformer")
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
    t.add_argument("--clip-norm", type=float, default=None, metavar="X",
                   help="clip the gradient norm at X; 0 turns it off (default: 1.0 for rnn and transformer, off else)")
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

    g = sub.add_parser("generate", help="sample text from a trained character-level model")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    g.add_argument("--length", type=int, default=300, help="characters to sample after the prompt")
    g.add_argument("--temperature", type=float, default=0.8, help="below 1 is more conservative; 0 is greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])

    b = sub.add_parser("bench", help="time gpunet against PyTorch on this machine (kernels and models)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    b.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated parts of benchmark names, e.g. gemm,lstm")
    b.add_argument("--json", default=None, metavar="FILE")
    b.add_argument("--markdown", default=None, metavar="FILE")
    b.add_argument("--plot", default=None, metavar="FILE", help="bar chart of the ratios (PNG)")
    b.add_argument("--repeats", type=_positive_int, default=None, help="timed rounds per side (default 7)")
    b.add_argument("--tiny", action="store_true", help="smallest sizes and 3 rounds: checks the harness in seconds")

    p = sub.add_parser("parity", help="train on the CPU and on the GPU from one seed and compare them")
    p.add_argument("--model", default="mlp", choices=sorted(RECIPES))
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("info", help="versions, devices and why a GPU is (un)usable")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "bench": cmd_bench,
            "parity": cmd_parity, "info": cmd_info}[args.command](args)


def cmd_train(args) -> int:
    r = recipe(args.model)
    dataset = args.dataset or r.dataset
    if (dataset in TEXT_DATASETS) != (r.kind == "text"):
        wanted = "a text dataset (shakespeare)" if r.kind == "text" else "an image dataset (mnist-sample, mnist)"
        raise SystemExit(f"gpunet train: --model {args.model} needs {wanted}, not --dataset {dataset}")
    gn.manual_seed(args.seed)
    dev = _device(args)
    print(f"device: {dev.name} ({dev.reason})")
    ds = load_dataset(dataset, args.data_dir, args.download, args.val_fraction, args.seed)
    model = r.build(ds)
    if r.kind == "text":
        model.preprocess = text_preprocess(ds.vocabulary)
        train, val = CharWindows(ds.train, r.context), consecutive_windows(ds.val, r.context)
    else:
        model.preprocess = image_preprocess(ds.x_train, r.input_shape)
        train, val = gn.train.ArrayData(ds.x_train, ds.y_train, shift=r.shift), (ds.x_val, ds.y_val)
    model.to(dev)
    print(summary(model, r.input_shape, r.input_dtype))
    steps = args.steps if args.steps or args.epochs else r.steps
    epochs = None if steps else (args.epochs or r.epochs)
    optimizer = gn.optim.OPTIMIZERS[args.optimizer or r.optimizer](model, lr=args.lr or r.lr)
    batch = args.batch_size or r.batch_size
    batches_per_epoch = -(-len(train) // batch)
    evals = epochs if epochs else max(1, min(20, steps // min(batches_per_epoch, 100)))
    schedule = gn.optim.CosineLR(optimizer, t_max=evals) if r.schedule == "cosine" else None
    clip = r.clip_norm if args.clip_norm is None else (args.clip_norm or None)
    print(f"training {args.model} on {ds.name}: {len(train)} train / {len(val[0])} validation "
          f"{'windows' if r.kind == 'text' else 'samples'}, {'%d epochs' % epochs if epochs else '%d steps' % steps}, "
          f"batch {batch}, {type(optimizer).__name__} lr {optimizer.lr}" + (f", gradient clipping at norm {clip}" if clip else ""))
    out = Path(args.out)
    try:
        history = gn.fit(model, train, val, optimizer=optimizer, epochs=epochs, steps=steps, batch_size=batch,
                         eval_every=None if epochs else max(1, steps // evals), schedule=schedule, clip_norm=clip,
                         early_stopping=args.early_stopping, out_dir=out, resume=args.resume, seed=args.seed,
                         progress=False if args.no_progress else None)
    except gn.train.DeviceOutOfMemory as exc:
        raise SystemExit(f"gpunet train: {exc}") from None
    best = min(history.records, key=lambda rec: rec["val_loss"])
    last = history.last()
    unit = " nats/char" if r.kind == "text" else ""
    print(f"final: train_loss {last['train_loss']:.4f}  val_loss {last['val_loss']:.4f}{unit}  "
          f"val_accuracy {last.get('val_accuracy', float('nan')):.4f}")
    print(f"best (saved): step {best['step']}  val_loss {best['val_loss']:.4f}{unit}  "
          f"val_accuracy {best.get('val_accuracy', float('nan')):.4f}")
    print(f"wrote {out / 'model.safetensors'}, {out / 'last.safetensors'}, {out / 'history.json'}, "
          f"{out / 'metrics.csv'}, {out / 'history.png'}")
    return 0


def cmd_generate(args) -> int:
    model = gn.load(args.checkpoint)
    model.to(_device(args))
    try:
        text = generate(model, args.prompt, args.length, args.temperature, args.seed)
    except ValueError as exc:
        raise SystemExit(f"gpunet generate: {args.checkpoint}: {exc}") from None
    print(text)
    return 0


def cmd_eval(args) -> int:
    model = gn.load(args.checkpoint)
    if (model.preprocess or {}).get("kind") == "text":
        raise SystemExit(f"gpunet eval: {args.checkpoint} is a character-level model; eval takes image classifiers "
                         "(its validation loss is in the history.json beside it; sample it with gpunet generate)")
    dev = _device(args)
    model.to(dev)
    images, labels = read_idx(args.images), read_idx(args.labels)
    if len(images) != len(labels):
        raise SystemExit(f"gpunet eval: {args.images} has {len(images)} images but {args.labels} has {len(labels)} labels")
    result = gn.evaluate(model, images, labels.astype("int64"), batch_size=args.batch_size)
    print(f"device: {dev.name}; model: {args.checkpoint}")
    print(json.dumps({"accuracy": round(result["accuracy"], 6), "loss": round(result["loss"], 6),
                      "samples": result["samples"]}))
    return 0


def cmd_bench(args) -> int:
    from gpunet.benchmarks import report, runner

    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("gpunet bench: every benchmark compares with PyTorch, which is not installed "
                         "(pip install torch==2.13.0, or pip install -e '.[test]')") from None
    dev = _device(args)
    skipped = []
    if dev.name == "cpu" and not gn.has_gpu():
        skipped.append(("every GPU comparison", gn.backend.gpu_status()[1]))
    if dev.name == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpunet bench: PyTorch here has no CUDA, so there is nothing to compare with on the GPU; "
                         "use --device cpu")
    env = report.environment(dev.name)
    print(f"gpunet bench on {dev.name}: {report.machine_name(env)}" + (" (tiny sizes)" if args.tiny else ""))
    only = [w for w in args.only.split(",") if w] if args.only else None
    try:
        results = runner.run(dev.name, only, args.tiny, args.repeats)
    except ValueError as exc:
        raise SystemExit(f"gpunet bench: {exc}") from None
    print(report.table(results, skipped))
    if args.json:
        report.write_text(args.json, report.to_json(results, skipped, env, args.tiny))
    if args.markdown:
        report.write_text(args.markdown, report.markdown(results, skipped, env))
    if args.plot:
        report.plot(results, args.plot, env)
    written = [f for f in (args.json, args.markdown, args.plot) if f]
    if written:
        print("wrote " + ", ".join(written))
    return 0


def cmd_parity(args) -> int:
    from gpunet import parity

    if not gn.has_gpu():
        raise SystemExit(f"gpunet parity compares the CPU with the GPU, and no GPU is usable: {gn.backend.gpu_status()[1]}")
    print(parity.format_report(parity.compare(args.model, args.steps, ("cpu", "gpu"), args.batch_size, args.seed)))
    return 0


def cmd_info(args) -> int:
    import numba

    print(f"gpunet {gn.__version__}; Python {platform.python_version()}; NumPy {numpy.__version__}; Numba {numba.__version__}")
    for line in device_info():
        print(line)
    return 0


def _device(args):
    """The requested device; a GPU that was asked for but is unusable ends the command with why."""
    try:
        return gn.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"gpunet {args.command}: {exc}") from None


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
