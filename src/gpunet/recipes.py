"""Default training recipes of `gpunet train --model NAME`: the model, its data and the
hyperparameters that earn its accuracy on the default dataset. CLI flags override them."""
from __future__ import annotations

from dataclasses import dataclass

from gpunet import models


@dataclass
class Recipe:
    build: object  # (dataset) -> model
    input_shape: tuple
    batch_size: int
    lr: float
    epochs: int | None = None  # the length of a default run: epochs, or else optimizer steps
    steps: int | None = None
    kind: str = "image"  # "image" (classifiers on mnist-sample/mnist) or "text" (character models)
    dataset: str = "mnist-sample"
    # a name in gpunet.optim.OPTIMIZERS, built with `lr` and that optimizer's defaults for the rest
    # (weight decay: none, or 0.01 for adamw), as `gpunet train --optimizer NAME` builds it
    optimizer: str = "adam"
    schedule: str = "cosine"
    shift: int = 0  # random image shifts of up to this many pixels
    clip_norm: float | None = None
    context: int | None = None  # characters per training window, for text

    @property
    def input_dtype(self) -> str:
        return "int64" if self.kind == "text" else "float32"


CONTEXT = 64

RECIPES = {
    "mlp": Recipe(build=lambda ds: models.mlp((784, 300, 100, ds.num_classes), dropout=0.1),
                  input_shape=(784,), epochs=30, batch_size=128, lr=1e-3, shift=1),
    # LeNet reached 98.85% on 2,000 held-out sample digits (15 epochs, 19 s on 2 cores).
    "cnn": Recipe(build=lambda ds: models.lenet(ds.num_classes), input_shape=(1, 28, 28), epochs=15,
                  batch_size=64, lr=2e-3, shift=1),
    # Character models on Tiny Shakespeare, batch 32 x 64 characters, Adam 3e-3 with a cosine decay.
    "rnn": Recipe(build=lambda ds: models.char_rnn(ds.num_classes, embedding_dim=64, hidden_size=256),
                  input_shape=(CONTEXT,), steps=2000, batch_size=32, lr=3e-3, kind="text", dataset="shakespeare",
                  clip_norm=1.0, context=CONTEXT),
    "transformer": Recipe(build=lambda ds: models.transformer(ds.num_classes, context=CONTEXT, d_model=128,
                                                              num_heads=4, num_layers=2),
                          input_shape=(CONTEXT,), steps=2000, batch_size=32, lr=3e-3, kind="text",
                          dataset="shakespeare", clip_norm=1.0, context=CONTEXT),
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
