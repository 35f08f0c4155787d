"""Default training recipes of `gpunet train --model NAME`: the model, its data and the
hyperparameters that earn its accuracy on the default dataset. CLI flags override them."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from gpunet import models
from gpunet.optim import OPTIMIZERS, CosineLR


@dataclass
class Recipe:
    builder: object  # (dataset, **arch) -> model
    input_shape: tuple
    batch_size: int
    lr: float
    arch: dict = field(default_factory=dict)  # the model's shape settings (widths, dropout) that a search varies
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
    weight_decay: float | None = None  # None: the optimizer's default
    warmup: float = 0.0  # the first fraction of the run's optimizer steps warms the rate up linearly
    momentum: float | None = None  # SGD's momentum (None: SGD's default, none); only for optimizer "sgd"

    @property
    def input_dtype(self) -> str:
        return "int64" if self.kind == "text" else "float32"

    def build(self, ds, **arch):
        """The recipe's model for dataset ds; arch overrides some of its shape settings."""
        unknown = sorted(set(arch) - set(self.arch))
        if unknown:
            raise ValueError(f"unknown model setting(s) {', '.join(unknown)}; this model has "
                             f"{', '.join(self.arch) or 'none'}")
        return self.builder(ds, **{**self.arch, **arch})

    def make_optimizer(self, model, name: str | None = None, lr: float | None = None,
                       weight_decay: float | None = None, momentum: float | None = None):
        """The recipe's optimizer for model; each argument given replaces the recipe's (the recipe's
        momentum goes with its own optimizer only)."""
        name = name or self.optimizer
        settings = {}
        decay = self.weight_decay if weight_decay is None else weight_decay
        if decay is not None:
            settings["weight_decay"] = decay
        if momentum is None and name == self.optimizer:
            momentum = self.momentum
        if momentum is not None:
            if name != "sgd":
                raise ValueError(f"momentum is a setting of the sgd optimizer; {name} has none")
            settings["momentum"] = momentum
        return OPTIMIZERS[name](model, lr=lr or self.lr, **settings)

    def make_schedule(self, optimizer, total_steps: int, warmup: float | None = None):
        """The recipe's schedule over a run of total_steps optimizer steps (None: a constant rate)."""
        if self.schedule != "cosine":
            return None
        fraction = self.warmup if warmup is None else warmup
        return CosineLR(optimizer, t_max=total_steps, warmup=min(int(fraction * total_steps), total_steps - 1))


CONTEXT = 64


def _features(ds) -> int:
    """The values in one image of ds: an MLP takes images of any size (`gpunet train --data`), flattened;
    data without its images at hand (a search's) is MNIST's 28x28."""
    images = getattr(ds, "x_train", None)
    return int(numpy.prod(images.shape[1:])) if images is not None else 784


RECIPES = {
    # 1024-256 with dropout 0.2 and shifts of up to 2 pixels, 60 epochs: the lowest selection loss of the
    # second round of `gpunet search` candidates (bench/RESULTS.md: the MLP recipe, second round), after the
    # seed's 300-100 (dropout 0.1, 1-pixel shifts), the first round's choice, missed 98% held out.
    "mlp": Recipe(builder=lambda ds, hidden1, hidden2, dropout: models.mlp(
                      (_features(ds), hidden1, hidden2, ds.num_classes), dropout=dropout),
                  arch={"hidden1": 1024, "hidden2": 256, "dropout": 0.2},
                  input_shape=(784,), epochs=60, batch_size=128, lr=1e-3, shift=2),
    # wide_cnn(width=8): two conv-BN-ReLU-pool stages (8 and 16 channels), dropout, a 128-unit head; about
    # as fast on the CPU as LeNet-5 (the recipe before it). The lowest selection loss of four candidates
    # (width 6 or 8, dropout 0.1 or 0.25, lr 2e-3 or 4e-3; bench/RESULTS.md)
    "cnn": Recipe(builder=lambda ds, width, dropout: models.wide_cnn(ds.num_classes, width=width, dropout=dropout,
                                                                     conv_bias=False),
                  arch={"width": 8, "dropout": 0.1},
                  input_shape=(1, 28, 28), epochs=15, batch_size=64, lr=2e-3, shift=1),
    # resnet(width=16, blocks=2): a 3x3 conv-BN-ReLU stem and three stages of two basic blocks (16, 32, 64
    # channels at 28x28, 14x14, 7x7; projection shortcuts where the shape changes), global average pooling, a
    # Dense head; Adam 3e-3, cosine, 2-pixel shifts, batch 16, 20 epochs: round 7's lowest mean selection loss
    # over three selection splits (search seeds 0 to 2: 0.0147 against width 24's 0.0228 and one block's 0.0242,
    # the recipe before, re-measured after 778c43d made the CPU path faster; 415 s of CPU a search run, about
    # 461 s a held-out run, within the 10 minutes). Rounds 1 to 6 had picked width 16, 2-pixel shifts, batch 16
    # and Adam 3e-3 (width 8 or 12, shifts of 1 or 3, batch 64, 32 or 8, lr 1e-3, 2e-3 or 4e-3, weight decay
    # 5e-4, a 5% warm-up, head dropout 0.1, 25 epochs, SGD with momentum lost; bench/RESULTS.md, the ResNet).
    # Batch 16 costs the CPU what batch 64 does per sample (3.0 against 3.3 ms a sample).
    "resnet": Recipe(builder=lambda ds, width, blocks, dropout: models.resnet(ds.num_classes, width=width,
                                                                             blocks=blocks, dropout=dropout),
                     arch={"width": 16, "blocks": 2, "dropout": 0.0},
                     input_shape=(1, 28, 28), epochs=20, batch_size=16, lr=3e-3, shift=2),
    # Character models on Tiny Shakespeare, batches of 64 windows of 64 characters, Adam with a cosine decay,
    # each the lowest selection loss (the text before the validation text) of the few `gpunet search`
    # candidates of bench/RESULTS.md: an LSTM of 384 units at 6e-3 (it beat 256 units at batch 64 or 32);
    # the transformer at 3e-3 after a warm-up over 5% of the steps.
    "rnn": Recipe(builder=lambda ds, embedding_dim, hidden_size, dropout: models.char_rnn(
                      ds.num_classes, embedding_dim=embedding_dim, hidden_size=hidden_size, dropout=dropout),
                  arch={"embedding_dim": 64, "hidden_size": 384, "dropout": 0.0},
                  input_shape=(CONTEXT,), steps=2000, batch_size=64, lr=6e-3, kind="text", dataset="shakespeare",
                  clip_norm=1.0, context=CONTEXT),
    "transformer": Recipe(builder=lambda ds, d_model, num_layers, dropout: models.transformer(
                              ds.num_classes, context=CONTEXT, d_model=d_model, num_heads=4, num_layers=num_layers,
                              dropout=dropout),
                          arch={"d_model": 128, "num_layers": 2, "dropout": 0.0},
                          input_shape=(CONTEXT,), steps=2000, batch_size=64, lr=3e-3, warmup=0.05, kind="text",
                          dataset="shakespeare", clip_norm=1.0, context=CONTEXT),
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
