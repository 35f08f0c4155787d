"""Activation memory per training precision (issue 30, item 5): the bytes the layers of each recipe's model
keep from a training-mode forward for the backward (gpunet.summary.saved_bytes: each array's memory once), at
the recipe's batch size, in fp32, bf16 and fp16.

    python bench/precision_memory.py [--device cpu|gpu]      (gpu without a GPU: the CuPy stand-in of tests/)

Parameters, gradients and the optimizer's state are float32 in every precision and are not counted here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn", "rnn", "transformer")


def measure(name: str, device: str, precisions=("fp32", "bf16", "fp16")) -> dict:
    import gpunet as gn
    from gpunet.backend import precision
    from gpunet.recipes import RECIPES
    from gpunet.summary import saved_bytes

    recipe = RECIPES[name]
    classes = 65 if recipe.kind == "text" else 10
    gn.manual_seed(0)
    model = recipe.build(SimpleNamespace(num_classes=classes, x_train=None)).to(device).train()
    r = numpy.random.default_rng(0)
    shape = (recipe.batch_size, *recipe.input_shape)
    x = r.integers(0, classes, shape) if recipe.kind == "text" else r.standard_normal(shape).astype("float32")
    x = gn.backend.to_device(x, device)
    found = {}
    for kind in precisions:
        with precision.using(kind):
            model.forward(x)
        found[kind] = saved_bytes(model)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args(argv)
    if args.device == "gpu":
        sys.path.insert(0, str(ROOT))
        from tests import gpu_standin  # noqa: F401  (a real GPU when there is one, else the stand-in)
        gpu_standin.activate()
    print("| model | batch | fp32 MB | bf16 MB (ratio) | fp16 MB (ratio) |")
    print("|---|---|---|---|---|")
    from gpunet.recipes import RECIPES
    for name in MODELS:
        found = measure(name, args.device)
        fp32 = found["fp32"]
        cells = [f"{found[k] / 2**20:.2f} ({found[k] / fp32:.3f})" for k in ("bf16", "fp16")]
        print(f"| {name} | {RECIPES[name].batch_size} | {fp32 / 2**20:.2f} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
