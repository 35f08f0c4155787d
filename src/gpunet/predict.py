"""`gpunet predict MODEL --images FILE`: the classes a saved image classifier gives the raw images of an
.npy or IDX file, through the preprocessing saved with it; one line per image:
`IMAGE<TAB>CLASS<TAB>PROBABILITY`, and with --top K the K most probable classes, most probable first."""
from __future__ import annotations

import numpy

import gpunet as gn
from gpunet import validate
from gpunet.backend.precision import PRECISIONS
from gpunet.layers.inputs import image_dims
from gpunet.data.user import read_array


def add_parser(sub, device_option: dict) -> None:
    p = sub.add_parser("predict", help="class ids and probabilities of a saved classifier for raw images")
    p.add_argument("checkpoint")
    p.add_argument("--images", required=True, metavar="FILE",
                   help="raw images as the model was trained on (e.g. uint8 0..255): .npy, .idx or .idx.gz")
    p.add_argument("--top", type=validate.cli_positive_int, default=1, metavar="K",
                   help="print the K most probable classes of each image (default 1)")
    p.add_argument("--device", **device_option)
    p.add_argument("--batch-size", type=validate.cli_positive_int, default=1000)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (default, whatever the model trained "
                   "in), or bf16 | fp16 products (docs/precision.md)")


def run(args) -> int:
    model = gn.load(args.checkpoint)
    validate.one_input_and_output(model, "predict", args.checkpoint)
    spec = model.preprocess or {}
    if spec.get("kind") == "text":
        raise SystemExit(f"gpunet predict: {args.checkpoint} is a character-level model; predict takes image "
                         "classifiers (sample it with gpunet generate)")
    images = read_array(args.images)
    validate.not_empty(len(images) if images.ndim else 0, args.images, "images")
    image_dims(images, args.images)
    validate.images(images, spec, args.images)
    model.to(gn.device(args.device))
    classes, probabilities = model.predict(images, args.batch_size, precision=args.precision)
    if probabilities.ndim != 2:
        raise ValueError(f"{args.checkpoint}: the model gives outputs of shape {probabilities.shape[1:]} per image, "
                         "not one score per class")
    top = min(args.top, probabilities.shape[1])
    order = numpy.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    print("image\t" + "\t".join(["class\tprobability"] * top))
    for i, best in enumerate(order):
        print(f"{i}\t" + "\t".join(f"{c}\t{probabilities[i, c]:.6f}" for c in best))
    return 0
