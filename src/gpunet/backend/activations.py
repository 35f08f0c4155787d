"""The activations, in one table: each one's forward and derivative written against the ops' `xp`,
whether its derivative can be read from its output alone, and its code in the CUDA kernels.

A layer may fuse an activation into its GEMM's or convolution's epilogue, keeping only the output,
exactly when the derivative reads the output alone (`from_output`): relu' is y > 0, sigmoid' is
y (1 - y), tanh' is 1 - y^2; GELU's derivative needs the pre-activation.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_HALF = 1 / math.sqrt(2.0)


@dataclass(frozen=True)
class Activation:
    name: str
    code: int  # ACT_* of kernels/gemm.cu
    from_output: bool  # the derivative is a function of the output alone
    forward: Callable  # (ops, x, out) -> y, into out when given
    backward: Callable  # (ops, x, y, dy) -> dx


def _into(y, x, out):
    y = y.astype(x.dtype, copy=False)
    if out is None:
        return y
    out[...] = y
    return out


def _sigmoid(ops, x, out):
    e = ops.xp.exp(-ops.xp.abs(x))  # exp of a non-positive number only: no overflow warnings for large |x|
    return _into(ops.xp.where(x >= 0, 1 / (1 + e), e / (1 + e)), x, out)


def _gelu_backward(ops, x, y, dy):
    cdf = 0.5 * (1 + ops.erf(x * _SQRT_HALF))
    pdf = ops.xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    return (dy * (cdf + x * pdf)).astype(x.dtype, copy=False)


def _gelu_tanh_forward(ops, x, out):
    return _into(0.5 * x * (1 + ops.xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))), x, out)


def _gelu_tanh_backward(ops, x, y, dy):
    t = ops.xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    dinner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)).astype(x.dtype, copy=False)


TABLE = {a.name: a for a in (
    Activation("relu", 1, True, lambda ops, x, out: ops.xp.maximum(x, 0, out=out),
               lambda ops, x, y, dy: dy * (x > 0)),
    Activation("sigmoid", 2, True, _sigmoid, lambda ops, x, y, dy: dy * y * (1 - y)),
    Activation("tanh", 3, True, lambda ops, x, out: ops.xp.tanh(x, out=out), lambda ops, x, y, dy: dy * (1 - y * y)),
    Activation("gelu", 4, False, lambda ops, x, out: _into(0.5 * x * (1 + ops.erf(x * _SQRT_HALF)), x, out),
               _gelu_backward),
    Activation("gelu_tanh", 5, False, _gelu_tanh_forward, _gelu_tanh_backward),
)}
NAMES = tuple(TABLE)


def lookup(name: str) -> Activation:
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {NAMES}") from None


def from_output(name: str | None) -> bool:
    """Whether a layer can fuse `name` (None: no activation) and keep only its output."""
    return name is None or lookup(name).from_output
