"""Elementwise activations and Softmax as layers (no parameters)."""
from __future__ import annotations

from gpunet.backend import Array, activations, ops_for, precision
from gpunet.layers.base import Layer, register


class Activation(Layer):
    """An elementwise activation layer; `kind` names it for the ops (and for a layer that absorbs it)."""

    kind = ""

    def forward(self, x: Array) -> Array:
        ops = ops_for(x, op=f"{type(self).__name__}.forward")
        y = ops.activation(self.kind, x)
        if precision.current() == "fp32":
            self.save_for_backward(x=x, y=y)  # relu', sigmoid' and tanh' read y; gelu' reads x
        elif self.kind == "relu":  # mixed precision: only what the derivative reads, ReLU's sign in 16 bits
            self.save_for_backward(x=None, y=ops.store_16bit(y, hand_on=True))  # (as Dense keeps a fused ReLU's)
        elif activations.from_output(self.kind):
            self.save_for_backward(x=None, y=y)
        else:
            self.save_for_backward(x=x, y=None)
        return y

    def backprop(self, dy, saved, need_dx):
        ops = ops_for(dy, op=f"{type(self).__name__}.backward")
        y = saved.y  # (a ReLU's: 16 bits in mixed precision, which the ops read as kept)
        return ops.activation_backward(self.kind, y if saved.x is None else saved.x, y, dy)  # relu'(x) = relu'(y)


@register("ReLU")
class ReLU(Activation):
    kind = "relu"


@register("Sigmoid")
class Sigmoid(Activation):
    kind = "sigmoid"


@register("Tanh")
class Tanh(Activation):
    kind = "tanh"


@register("GELU")
class GELU(Activation):
    """GELU as torch.nn.GELU: approximate="none" (erf, the default) or "tanh"."""

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(approximate=approximate)
        self.kind = "gelu" if approximate == "none" else "gelu_tanh"


@register("Softmax")
class Softmax(Layer):
    """Softmax over `dim` (default the last axis)."""

    def __init__(self, dim: int = -1):
        super().__init__(dim=dim)
        self.dim = dim

    def forward(self, x: Array) -> Array:
        y = ops_for(x, op="Softmax.forward").softmax(x, axis=self.dim)
        self.save_for_backward(y=y)
        return y

    def backprop(self, dy, saved, need_dx):
        return ops_for(dy, op="Softmax.backward").softmax_backward(saved.y, dy, axis=self.dim)


@register("Identity")
class Identity(Layer):
    def forward(self, x: Array) -> Array:
        self.save_for_backward()
        return x

    def backprop(self, dy, saved, need_dx):
        return dy
