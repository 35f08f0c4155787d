"""Elementwise activations and Softmax as layers (no parameters)."""
from __future__ import annotations

from gpunet.backend import ops_for
from gpunet.layers.base import Layer


class _Activation(Layer):
    kind = ""

    def forward(self, x):
        ops = ops_for(x, op=f"{type(self).__name__}.forward")
        y = ops.activation(self.kind, x)
        self._x, self._y = x, y
        return y

    def backward(self, dy):
        ops = ops_for(dy, op=f"{type(self).__name__}.backward")
        return ops.activation_backward(self.kind, self._x, self._y, dy)


class ReLU(_Activation):
    kind = "relu"


class Sigmoid(_Activation):
    kind = "sigmoid"


class Tanh(_Activation):
    kind = "tanh"


class GELU(_Activation):
    """GELU as torch.nn.GELU: approximate="none" (erf, the default) or "tanh"."""

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(approximate=approximate)
        self.kind = "gelu" if approximate == "none" else "gelu_tanh"


class Softmax(Layer):
    """Softmax over `dim` (default the last axis)."""

    def __init__(self, dim: int = -1):
        super().__init__(dim=dim)
        self.dim = dim

    def forward(self, x):
        self._y = ops_for(x, op="Softmax.forward").softmax(x, axis=self.dim)
        return self._y

    def backward(self, dy):
        return ops_for(dy, op="Softmax.backward").softmax_backward(self._y, dy, axis=self.dim)


class Identity(Layer):
    def forward(self, x):
        return x

    def backward(self, dy):
        return dy
