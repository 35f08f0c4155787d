"""Multi-layer perceptrons built from Dense, activations, BatchNorm1d and Dropout."""
from __future__ import annotations

from collections.abc import Sequence

from gpunet.layers import GELU, BatchNorm1d, Dense, Dropout, Layer, ReLU, Sequential, Sigmoid, Tanh

ACTIVATION_LAYERS: dict[str, type[Layer]] = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "gelu": GELU}


def mlp(sizes: Sequence[int] = (784, 300, 100, 10), activation: str = "relu", dropout: float = 0.0,
        batch_norm: bool = False, init: str = "xavier_uniform") -> Sequential:
    """Dense layers of the given sizes with `activation` between them.

    The output is logits: the softmax lives in the loss (gn.losses.softmax_cross_entropy), where
    it fuses with the cross-entropy. Weights are initialised for the activation (init: any name of
    gpunet.init, e.g. "xavier_uniform" with the per-activation gain, or "kaiming_normal").
    Seed architectures: mlp() is 784-300-100-10 ReLU; mlp((784, 28, 10), "sigmoid") the small one.
    Layer order per hidden layer: Dense, [BatchNorm1d], activation, [Dropout].
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"mlp: need at least input and output sizes, got {sizes}")
    if activation not in ACTIVATION_LAYERS:
        raise ValueError(f"mlp: unknown activation {activation!r}; choose one of {sorted(ACTIVATION_LAYERS)}")
    layers: list[Layer] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(Dense(fan_in, fan_out, init=init, init_activation=None if last else activation))
        if last:
            break
        if batch_norm:
            layers.append(BatchNorm1d(fan_out))
        layers.append(ACTIVATION_LAYERS[activation]())
        if dropout:
            layers.append(Dropout(dropout))
    return Sequential(*layers)
