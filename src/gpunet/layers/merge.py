"""Merge layers: several inputs (a list of arrays) into one, for graph models. Add and Multiply take
inputs of one shape (no broadcasting: a shape mismatch is an error, as in Keras); Concatenate joins
them along an axis other than the batch axis."""
from __future__ import annotations

from gpunet.backend import ops_for
from gpunet.layers.base import Layer, register


class Merge(Layer):
    same_shape = True
    takes_list = True

    def _inputs(self, xs) -> list:
        if not isinstance(xs, (list, tuple)) or len(xs) < 2:
            got = f"a list of {len(xs)}" if isinstance(xs, (list, tuple)) else f"one {type(xs).__name__}"
            raise ValueError(f"{self.describe()}: expected a list of 2 or more arrays, got {got}")
        ops_for(*xs, op=f"{type(self).__name__}.forward")  # one device for all
        first = xs[0]
        for i, x in enumerate(xs[1:], 1):
            if x.dtype != first.dtype:
                raise TypeError(f"{self.describe()}: input {i} is {x.dtype}, input 0 is {first.dtype}")
            if self.same_shape and x.shape != first.shape:
                raise ValueError(f"{self.describe()}: inputs must have one shape; input 0 is {tuple(first.shape)}, "
                                 f"input {i} is {tuple(x.shape)}")
        return list(xs)


@register("Add")
class Add(Merge):
    """The sum of its inputs: a residual connection's join."""

    def forward(self, xs):
        xs = self._inputs(xs)
        y = xs[0] + xs[1]
        for x in xs[2:]:
            y += x
        self.save_for_backward(count=len(xs))
        return y

    def backprop(self, dy, saved, need_dx):
        return [dy] * saved.count


@register("Multiply")
class Multiply(Merge):
    """The elementwise product of its inputs (a gate)."""

    def forward(self, xs):
        xs = self._inputs(xs)
        y = xs[0] * xs[1]
        for x in xs[2:]:
            y = y * x
        self.save_for_backward(xs=xs)
        return y

    def backprop(self, dy, saved, need_dx):
        grads = []
        for i in range(len(saved.xs)):
            g = dy
            for j, x in enumerate(saved.xs):
                if j != i:
                    g = g * x
            grads.append(g)
        return grads


@register("Concatenate")
class Concatenate(Merge):
    """Its inputs joined along `axis` (counted with the batch axis, as torch.cat's dim; -1 the last)."""

    same_shape = False

    def __init__(self, axis: int = -1):
        super().__init__(axis=axis)
        self.axis = axis

    def forward(self, xs):
        xs = self._inputs(xs)
        ndim = xs[0].ndim
        axis = self.axis + ndim if self.axis < 0 else self.axis
        if not 1 <= axis < ndim:
            raise ValueError(f"{self.describe()}: axis {self.axis} is not a feature axis of inputs of shape "
                             f"{tuple(xs[0].shape)} (axis 0 is the batch)")
        for i, x in enumerate(xs[1:], 1):
            if x.ndim != ndim or any(a != b for k, (a, b) in enumerate(zip(x.shape, xs[0].shape)) if k != axis):
                raise ValueError(f"{self.describe()}: input {i} has shape {tuple(x.shape)}, input 0 {tuple(xs[0].shape)}; "
                                 f"they may differ on axis {self.axis} only")
        self.save_for_backward(axis=axis, sizes=[x.shape[axis] for x in xs])
        return ops_for(*xs, op="Concatenate.forward").xp.concatenate(xs, axis=axis)

    def backprop(self, dy, saved, need_dx):
        parts, start = [], 0
        for size in saved.sizes:
            index = [slice(None)] * dy.ndim
            index[saved.axis] = slice(start, start + size)
            parts.append(dy[tuple(index)])
            start += size
        return parts
