"""The command line: gpunet train | search | eval | predict | generate | bench | parity | info
(also `python -m gpunet`)."""
from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy

import gpunet as gn
from gpunet import benchmarks, distributed, errors, extras, validate
from gpunet.training import resume
from gpunet import parity_command
from gpunet import predict as predict_command
from gpunet.backend import device_info
from gpunet.backend.devices import check_device_name
from gpunet.data import (TEXT_DATASETS, CharWindows, consecutive_windows, image_preprocess, load_dataset, read_idx,
                         text_preprocess)
from gpunet.data import user as user_data
from gpunet.generate import MAX_LENGTH, stream
from gpunet.training.history import strict_json
from gpunet.backend.precision import PRECISIONS
from gpunet.recipes import RECIPES, recipe
from gpunet.training.setup import RunSetup
from gpunet.search import command as search_command
from gpunet.summary import summary


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line (exit status 2)."""

    def error(self, message):
        raise errors.fail("", f"{self.prog}: {message} (usage: {self.prog} --help)", errors.USAGE)


def _device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


DEVICE_OPTION = {"default": "auto", "type": _device_name, "metavar": "auto|cpu|gpu|gpu:N",
                 "help": "gpu:N picks the N-th GPU CUDA shows (CUDA_VISIBLE_DEVICES chooses them; default: auto)"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpunet", description="Train and evaluate gpunet models.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also GPUNET_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and save it with its history")
    t.add_argument("--model", default="mlp", choices=sorted(RECIPES))
    t.add_argument("--dataset", default=None, choices=gn.data.DATASETS,
                   help="default: mnist-sample for mlp and cnn, shakespeare for rnn and transformer")
    t.add_argument("--data-dir", default=None, help="where downloaded datasets are cached (default $GPUNET_DATA, else $XDG_CACHE_HOME/gpunet or ~/.cache/gpunet)")
    t.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    t.add_argument("--data", default=None, metavar="PATH",
                   help="your own data instead of --dataset: a folder with train_images and train_labels (.npy or "
                        "IDX; optional val_images, val_labels) for mlp and cnn, a UTF-8 text file for rnn and transformer")
    t.add_argument("--device", **DEVICE_OPTION)
    length = t.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=validate.cli_positive_int, default=None)
    length.add_argument("--steps", type=validate.cli_positive_int, default=None, help="optimizer steps instead of epochs")
    t.add_argument("--batch-size", type=validate.cli_positive_int, default=None)
    t.add_argument("--accumulate", type=validate.cli_positive_int, default=1, metavar="N",
                   help="one optimizer step per N batches of --batch-size, their gradients summed: the step of a "
                        "batch N times as large, in the memory of one (steps, epochs and schedules count steps)")
    t.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (default; on --resume the run's own), or mixed precision bf16 | fp16: products of "
                        "16-bit operands summed in float32, float32 master weights (docs/precision.md)")
    t.add_argument("--lr", type=validate.cli_positive, default=None)
    t.add_argument("--optimizer", choices=sorted(gn.optim.OPTIMIZERS), default=None)
    t.add_argument("--seed", type=validate.cli_seed, default=0)
    t.add_argument("--clip-norm", type=validate.cli_non_negative, default=None, metavar="X",
                   help="clip the gradient norm at X; 0 turns it off (default: 1.0 for rnn and transformer, off else)")
    t.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the training step once as a CUDA graph and replay it (default: on when training "
                        "on a GPU)")
    t.add_argument("--val-fraction", type=validate.cli_fraction, default=0.1)
    t.add_argument("--holdout", type=validate.cli_non_negative_int, default=0, metavar="N",
                   help="keep the last N images of the dataset out of training and validation, and score the "
                        "trained model on them at the end")
    t.add_argument("--early-stopping", type=validate.cli_positive_int, default=None, metavar="EVALS",
                   help="stop after this many evaluations without a better validation loss")
    t.add_argument("--out", default=None,
                   help="output folder; refused when it holds a run, unless --resume or --overwrite (default: a new "
                        "folder runs/DATE-TIME-MODEL, with runs/latest pointing to it)")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.safetensors (without --out: the run runs/latest points to)")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds a run, moving that run into OUT/replaced-DATE-TIME")
    t.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: go on although the training data differs from the run's (refused otherwise)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a saved model on IDX images and labels")
    e.add_argument("checkpoint")
    e.add_argument("--images", required=True)
    e.add_argument("--labels", required=True)
    e.add_argument("--device", **DEVICE_OPTION)
    e.add_argument("--batch-size", type=validate.cli_positive_int, default=1000)
    e.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (default, whatever the model trained "
                   "in), or bf16 | fp16 products (docs/precision.md)")

    g = sub.add_parser("generate", help="sample text from a trained character-level model")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    g.add_argument("--length", type=validate.cli_int_up_to(MAX_LENGTH), default=300,
                   help=f"characters to sample after the prompt, printed as they come (default 300, at most "
                        f"{MAX_LENGTH:_})")
    g.add_argument("--temperature", type=validate.cli_non_negative, default=0.8,
                   help="below 1 is more conservative; 0 is greedy")
    g.add_argument("--seed", type=validate.cli_seed, default=0)
    g.add_argument("--device", **DEVICE_OPTION)

    b = sub.add_parser("bench", help="time gpunet against PyTorch on this machine (kernels and models)")
    b.add_argument("--device", **DEVICE_OPTION)
    b.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated parts of benchmark names, e.g. gemm,lstm")
    b.add_argument("--json", default=None, metavar="FILE")
    b.add_argument("--markdown", default=None, metavar="FILE")
    b.add_argument("--plot", default=None, metavar="FILE", help="bar chart of the ratios (PNG)")
    b.add_argument("--repeats", type=validate.cli_positive_int, default=None,
                   help=f"timed rounds per side (default {benchmarks.REPEATS}; {benchmarks.TINY_REPEATS} with --tiny)")
    b.add_argument("--tiny", action="store_true",
                   help=f"toy sizes (named by them) and {benchmarks.TINY_REPEATS} rounds of one call: a smoke test of "
                        "the harness in seconds, not a measurement")
    b.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the model rows' steps: gpunet in it as gn.fit, PyTorch under torch.autocast (fp16: both with "
                        "a dynamic loss scale); kernel and dispatch rows stay fp32 (default fp32)")
    b.add_argument("--ranks", type=validate.cli_positive_int, default=None, metavar="N",
                   help="instead: data-parallel training samples/s at 1 and N ranks through mpiexec (the mpi extra)")

    parity_command.add_parser(sub)
    search_command.add_parser(sub, DEVICE_OPTION)
    predict_command.add_parser(sub, DEVICE_OPTION)
    sub.add_parser("info", help="versions, devices and why a GPU is (un)usable")
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error (also GPUNET_DEBUG=1)")
    return parser


def main(argv=None) -> int:
    """Run one command. Every error ends in one line on stderr (see gpunet.errors): SystemExit
    with status 2 for a wrong command line, 1 for anything else, 130 after Ctrl-C."""
    _tolerant_output()
    args = build_parser().parse_args(argv)
    # ends_together: on several ranks, an error on only some of them ends the whole job (gpunet.distributed)
    # interrupt_on_signals: SIGTERM and SIGHUP end a command as Ctrl-C does (exit 143, 129), through its clean-up
    with distributed.ends_together(), errors.handled(args.command, _debug(args.debug)), resume.interrupt_on_signals():
        validate.environment()
        return {"train": cmd_train, "search": search_command.run, "predict": predict_command.run, "eval": cmd_eval, "generate": cmd_generate, "bench": cmd_bench,
                "parity": parity_command.run, "info": cmd_info}[args.command](args)


def _debug(flag: bool) -> bool:
    """--debug, or GPUNET_DEBUG=1 as validation reads it (gpunet.errors, a leaf, reads no settings). A value
    validation refuses is not on: the command then ends in the one line saying so."""
    try:
        return flag or validate.env_choice("GPUNET_DEBUG") == "1"
    except ValueError:
        return False


def _tolerant_output() -> None:
    """Paths that are not valid UTF-8 (or not ASCII, on a C locale) print escaped, not as a crash."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass


def cmd_train(args) -> int:
    r = recipe(args.model)
    if args.data is not None and (args.dataset or args.data_dir or args.download):
        raise errors.UsageError("--data trains on your own files; --dataset, --data-dir and --download pick a "
                                "built-in dataset: give one or the other")
    dataset = f"--data {os.path.abspath(args.data)}" if args.data is not None else args.dataset or r.dataset
    if args.data is None and (dataset in TEXT_DATASETS) != (r.kind == "text"):
        wanted = "a text dataset (shakespeare)" if r.kind == "text" else "an image dataset (mnist-sample, mnist)"
        raise errors.UsageError(f"--model {args.model} needs {wanted}, not --dataset {dataset}")
    if args.data_dir is not None and os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise NotADirectoryError(f"--data-dir {args.data_dir} is a file, not a folder")
    gn.manual_seed(args.seed)
    # the device, the world, the folder (made, locked and checked by rank 0 before any data is loaded): decided once
    setup = RunSetup.for_command(lambda: _device(args), args.out, args.model, resume=args.resume, overwrite=args.overwrite,
                                 seed=args.seed, allow_data_change=args.allow_data_change)
    try:
        print(f"device: {setup.device.name} ({setup.device.reason})")
        if setup.world.world_size > 1:
            print(f"world size: {setup.world.world_size} ({setup.world.world.backend}); each rank takes its share of "
                  "every batch")
        return _train(args, r, dataset, setup)
    finally:
        setup.close()


def _train(args, r, dataset, setup) -> int:
    if args.data is not None:  # the recipe adapts to the size of the user's images
        ds, r = user_data.load(args.data, r, args.val_fraction, args.seed, args.holdout)
    else:
        ds = load_dataset(dataset, args.data_dir, args.download, args.val_fraction, args.seed, args.holdout)
    model = r.build(ds)
    if r.kind == "text":
        model.preprocess = text_preprocess(ds.vocabulary)
        train, val = CharWindows(ds.train, r.context), consecutive_windows(ds.val, r.context)
    else:
        model.preprocess = image_preprocess(ds.x_train, r.input_shape)
        train, val = gn.train.ArrayData(ds.x_train, ds.y_train, shift=r.shift), (ds.x_val, ds.y_val)
    model.to(setup.device)
    print(summary(model, r.input_shape, r.input_dtype))
    steps = args.steps if args.steps or args.epochs else r.steps
    epochs = None if steps else (args.epochs or r.epochs)
    optimizer = r.make_optimizer(model, args.optimizer, args.lr)
    batch = args.batch_size or r.batch_size
    steps_per_epoch = -(-len(train) // (batch * args.accumulate))  # optimizer steps per epoch
    evals = epochs if epochs else max(1, min(20, steps // min(steps_per_epoch, 100)))
    total_steps = steps or epochs * steps_per_epoch  # the cosine decays over every optimizer step of the run
    schedule = r.make_schedule(optimizer, total_steps)
    clip = r.clip_norm if args.clip_norm is None else (args.clip_norm or None)
    print(f"training {args.model} on {ds.name}: {len(train)} train / {len(val[0])} validation "
          f"{'windows' if r.kind == 'text' else 'samples'}, {'%d epochs' % epochs if epochs else '%d steps' % steps}, "
          f"batch {batch}" + (f" x {args.accumulate} accumulated" if args.accumulate > 1 else "")
          + f", {type(optimizer).__name__} lr {schedule.base_lr if schedule else optimizer.lr}"
          + (f" after {schedule.warmup} warm-up steps" if getattr(schedule, "warmup", 0) else "")  # lr: warming up now
          + (f", gradient clipping at norm {clip}" if clip else ""))
    out = setup.out
    print(f"run folder: {out}" + (" (resumed)" if args.resume else ""))
    setup.folder.start()
    try:
        with numpy.errstate(all="ignore"):  # a diverging run is reported once, by fit, not by NumPy warnings
            history = gn.fit(model, train, val, optimizer=optimizer, epochs=epochs, steps=steps, batch_size=batch,
                             eval_every=None if epochs else max(1, steps // evals), schedule=schedule, clip_norm=clip,
                             early_stopping=args.early_stopping, setup=setup, accumulate=args.accumulate,
                             precision=args.precision,
                             progress=False if args.no_progress else None, cuda_graph=args.cuda_graph,
                             run_config={"model": args.model, "dataset": dataset, "val_fraction": args.val_fraction,
                                         **({"holdout": args.holdout} if args.holdout else {})})
    except gn.train.DeviceOutOfMemory as exc:
        raise SystemExit(f"gpunet train: {exc}") from None
    _report(history, out, " nats/char" if r.kind == "text" else "")
    if args.holdout:  # the model of the lowest validation loss, as saved, on images it has never seen
        held = gn.evaluate(model, ds.x_holdout, ds.y_holdout.astype("int64"), batch_size=batch)
        print(f"held out: accuracy {held['accuracy']:.4f}  loss {held['loss']:.4f} on the last {args.holdout} "
              f"images of {ds.name} (never trained or validated on)")
    return 0


def _report(history, out, unit: str) -> None:
    """The final metrics, the best model only when this run saved it, and only files that exist."""
    def metrics(rec):
        parts = [f"{k} {rec[k]:.4f}{unit if k.endswith('loss') and k != 'train_loss' else ''}"
                 for k in ("train_loss", "val_loss", "val_accuracy") if isinstance(rec.get(k), float)]
        return "  ".join(parts)

    last = history.last()
    if last:
        print(f"final: step {last['step']}  {metrics(last)}")
    best = next((rec for rec in history.records if rec["step"] == history.best_step), None)
    saved = out / "model.safetensors"
    if best is not None and saved in history.written and saved.exists():
        print(f"best (saved): step {best['step']}  {metrics(best)}")
    elif best is not None and saved.exists():  # a --resume that did not improve on the run's earlier part
        print(f"best: step {best['step']}  {metrics(best)} (saved before this run in {saved})")
    else:
        print("best: no model was saved by this run")
    written = [p for p in dict.fromkeys(history.written) if p.exists()]
    print("wrote " + (", ".join(str(p) for p in written) if written else "nothing"))


def cmd_generate(args) -> int:
    model = gn.load(args.checkpoint)
    model.to(_device(args))
    try:
        for piece in stream(model, args.prompt, args.length, args.temperature, args.seed):
            print(piece, end="", flush=True)  # as sampled: a long text shows from its first characters on
    except ValueError as exc:
        raise SystemExit(f"gpunet generate: {args.checkpoint}: {exc}") from None
    print()
    return 0


def cmd_eval(args) -> int:
    model = gn.load(args.checkpoint)
    validate.one_input_and_output(model, "eval", args.checkpoint)
    if (model.preprocess or {}).get("kind") == "text":
        raise SystemExit(f"gpunet eval: {args.checkpoint} is a character-level model; eval takes image classifiers "
                         "(its validation loss is in the history.json beside it; sample it with gpunet generate)")
    dev = _device(args)
    model.to(dev)
    for option in ("images", "labels"):  # a device or FIFO would never end or never start
        validate.not_special_file(getattr(args, option), f"--{option}")
    images, labels = read_idx(args.images), read_idx(args.labels)
    validate.not_empty(len(images), args.images, "images")
    if len(images) != len(labels):
        raise SystemExit(f"gpunet eval: {args.images} has {len(images)} images but {args.labels} has {len(labels)} labels")
    if labels.ndim != 1:
        raise ValueError(f"{args.labels}: labels must be one number per image, but the file holds an array of shape "
                         f"{labels.shape}")
    user_data.image_dims(images, args.images)
    validate.images(images, model.preprocess, args.images)
    validate.class_labels(labels, _num_classes(model, images[:1], dev), args.labels)
    result = gn.evaluate(model, images, labels.astype("int64"), batch_size=args.batch_size, precision=args.precision)
    print(f"device: {dev.name}; model: {args.checkpoint}")
    print(strict_json({"accuracy": round(result["accuracy"], 6), "loss": round(result["loss"], 6),
                       "samples": result["samples"]}))
    return 0


def _num_classes(model, sample, dev) -> int:
    """The number of outputs (classes) of model, from one sample."""
    was_training = model.training
    model.eval()
    try:
        x = gn.data.apply_preprocess(model.preprocess, gn.backend.to_device(sample, dev.name), dev.xp)
        return int(model.forward(x).shape[-1])
    finally:
        model.train(was_training)


def cmd_bench(args) -> int:
    from gpunet.benchmarks import report, runner, scaling

    if args.ranks:
        print(f"gpunet bench --ranks {args.ranks}: data-parallel training on the CPU, samples/s")
        print(scaling.table(scaling.run(args.ranks, steps=5 if args.tiny else 100)))
        return 0

    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("gpunet bench: every benchmark compares with PyTorch, which is not installed "
                         "(pip install 'gpunet[bench]'; the README says how to get its CPU build)") from None
    if args.plot and not extras.present("matplotlib"):
        raise errors.UsageError(f"--plot {args.plot} needs matplotlib, which is not installed (pip install 'gpunet[plot]')")
    for option in ("json", "markdown", "plot"):  # said before minutes of measuring, not after them
        target = getattr(args, option)
        if target and os.path.isdir(target):
            raise errors.UsageError(f"--{option} {target} is a folder; give the name of a file to write")
    dev = _device(args)
    skipped = []
    if dev.name == "cpu" and not gn.has_gpu():
        skipped.append(("every GPU comparison", gn.backend.gpu_status()[1]))
    if dev.name == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpunet bench: PyTorch here has no CUDA, so there is nothing to compare with on the GPU; "
                         "use --device cpu")
    env = report.environment(dev.name, args.precision)
    print(f"gpunet bench on {dev.name}: {report.machine_name(env)}" + (" (tiny sizes)" if args.tiny else "")
          + (f"; model steps in {args.precision}" if args.precision != "fp32" else ""))
    only = [w for w in args.only.split(",") if w] if args.only else None
    try:
        results = runner.run(dev.name, only, args.tiny, args.repeats, precision=args.precision, skipped=skipped)
    except ValueError as exc:
        raise SystemExit(f"gpunet bench: {exc}") from None
    print(report.table(results, skipped, args.tiny))
    if args.json:
        report.write_text(args.json, report.to_json(results, skipped, env, args.tiny))
    if args.markdown:
        report.write_text(args.markdown, report.markdown(results, skipped, env, args.tiny))
    if args.plot:
        report.plot(results, args.plot, env)
    written = [f for f in (args.json, args.markdown, args.plot) if f]
    if written:
        print("wrote " + ", ".join(written))
    return 0


def cmd_info(args) -> int:
    import numba

    print(f"gpunet {gn.__version__}; Python {platform.python_version()}; NumPy {numpy.__version__}; Numba {numba.__version__}")
    for line in device_info() + extras.optional_parts():
        print(line)
    return 0


def _device(args):
    """The requested device; a GPU that was asked for but is unusable ends the command with why."""
    try:
        return gn.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"gpunet {args.command}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
