"""Weight initialisers (float32 NumPy arrays, drawn from gpunet.random).

Glorot/Xavier with per-activation scales: for a layer of fan_in inputs and fan_out outputs,
uniform on [-r, r] with r = gain * sqrt(6 / (fan_in + fan_out)), or normal with
sigma = gain * sqrt(2 / (fan_in + fan_out)), where the gain keeps the variance of the
signal through the activation: 1 for tanh (and linear), 4 for the logistic sigmoid (its slope
at 0 is 1/4), sqrt(2) for ReLU (it zeroes half the inputs). He/Kaiming uses fan_in only:
sigma = gain / sqrt(fan_in).
"""
from __future__ import annotations

import math

import numpy

from gpunet import random

__all__ = ["GAINS", "INITIALISERS", "bias", "fans", "gain", "initialise", "kaiming_normal", "kaiming_uniform", "normal",
           "torch_default", "uniform", "xavier_normal", "xavier_uniform"]

GAINS = {"linear": 1.0, "identity": 1.0, "tanh": 1.0, "sigmoid": 4.0, "relu": math.sqrt(2.0),
         "gelu": math.sqrt(2.0), "gelu_tanh": math.sqrt(2.0)}


def gain(activation: str | None) -> float:
    key = activation or "linear"
    if key not in GAINS:
        raise ValueError(f"no initialisation gain for activation {activation!r}; known: {sorted(GAINS)}")
    return GAINS[key]


def fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight in PyTorch layout (out, in, *kernel)."""
    receptive = int(numpy.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def uniform(shape, bound: float, dtype="float32") -> numpy.ndarray:
    return random.generator().uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, std: float, dtype="float32") -> numpy.ndarray:
    return (random.generator().standard_normal(size=shape) * std).astype(dtype)


def xavier_uniform(shape, activation: str | None = None) -> numpy.ndarray:
    fan_in, fan_out = fans(shape)
    return uniform(shape, gain(activation) * math.sqrt(6.0 / (fan_in + fan_out)))


def xavier_normal(shape, activation: str | None = None) -> numpy.ndarray:
    fan_in, fan_out = fans(shape)
    return normal(shape, gain(activation) * math.sqrt(2.0 / (fan_in + fan_out)))


def kaiming_uniform(shape, activation: str | None = "relu") -> numpy.ndarray:
    return uniform(shape, gain(activation) * math.sqrt(3.0 / fans(shape)[0]))


def kaiming_normal(shape, activation: str | None = "relu") -> numpy.ndarray:
    return normal(shape, gain(activation) / math.sqrt(fans(shape)[0]))


def torch_default(shape) -> numpy.ndarray:
    """PyTorch's default for Linear/Conv weights and biases: uniform on +-1/sqrt(fan_in)."""
    fan_in = fans(shape)[0] if len(shape) > 1 else shape[0]
    return uniform(shape, 1.0 / math.sqrt(fan_in))


INITIALISERS = {"xavier_uniform": xavier_uniform, "xavier_normal": xavier_normal,
                "kaiming_uniform": kaiming_uniform, "kaiming_normal": kaiming_normal}


def initialise(name: str, shape, activation: str | None) -> numpy.ndarray:
    if name == "torch_default":
        return torch_default(shape)
    if name not in INITIALISERS:
        raise ValueError(f"unknown initialiser {name!r}; choose one of {['torch_default', *INITIALISERS]}")
    return INITIALISERS[name](shape, activation)


def bias(name: str, fan_in: int, out_features: int) -> numpy.ndarray:
    """PyTorch's uniform +-1/sqrt(fan_in) under torch_default, zeros otherwise."""
    if name == "torch_default":
        return uniform((out_features,), 1.0 / math.sqrt(fan_in))
    return numpy.zeros(out_features, dtype="float32")
