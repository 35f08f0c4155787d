"""`gpunet parity`: its options and its command (the comparison itself is gpunet.parity)."""
from __future__ import annotations

import gpunet as gn
from gpunet import errors, validate
from gpunet.recipes import RECIPES


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="train on the CPU and on the GPU from one seed and compare them")
    p.add_argument("--model", default="mlp", choices=sorted(RECIPES))
    p.add_argument("--steps", type=validate.cli_positive_int, default=20)
    p.add_argument("--batch-size", type=validate.cli_positive_int, default=None)
    p.add_argument("--seed", type=validate.cli_seed, default=0)
    p.add_argument("--dropout", type=validate.cli_dropout, default=None, metavar="P",
                   help="dropout rate for every dropout of the model; one on its output when it has none "
                        "(default: the recipe's own)")
    p.add_argument("--lockstep", action="store_true",
                   help="start every GPU step from the CPU's parameters and optimizer state: each step's "
                        "differences are then that step's rounding alone, held to a derived bound")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="bf16 or fp16: the same steps in fp32 and in that mixed precision on one device (--device), "
                        "in lockstep, held to the format's bound; fp32 (as without it): the CPU against the GPU")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="the device of a --precision bf16/fp16 comparison (default: cpu)")
    p.add_argument("--loss-scale", type=validate.cli_positive, default=None, metavar="S",
                   help="with --precision fp16: the loss scale to start from (default 65536, gn.fit's); a large one "
                        "forces overflows, which the report lists")


def run(args) -> int:
    from gpunet import parity

    if args.loss_scale is not None and args.precision != "fp16":
        raise errors.UsageError(f"--loss-scale {args.loss_scale:g} is fp16's starting loss scale: it needs "
                                f"--precision fp16 (bf16 and fp32 have no loss scaling)")
    if args.precision in ("bf16", "fp16"):
        if args.device == "gpu":
            try:
                gn.device("gpu")
            except RuntimeError as exc:
                raise SystemExit(f"gpunet parity --device gpu: {exc}") from None
        report = parity.compare(args.model, args.steps, (args.device, args.device), args.batch_size, args.seed,
                                args.dropout, True, precision=args.precision, init_scale=args.loss_scale)
        print(parity.format_report(report))
        return 0
    try:
        gn.device("gpu")
    except RuntimeError as exc:
        raise SystemExit(f"gpunet parity compares the CPU with the GPU: {exc}") from None
    report = parity.compare(args.model, args.steps, ("cpu", "gpu"), args.batch_size, args.seed, args.dropout,
                            args.lockstep)
    print(parity.format_report(report))
    return 0
