"""Layers that only change the shape of their input."""
from __future__ import annotations

from gpunet.backend import Array
from gpunet.layers.base import Layer, register


@register("Flatten")
class Flatten(Layer):
    """Flatten all axes from start_dim on, as torch.nn.Flatten."""

    def __init__(self, start_dim: int = 1):
        super().__init__(start_dim=start_dim)
        self.start_dim = start_dim

    def forward(self, x: Array) -> Array:
        self.save_for_backward(shape=x.shape)
        return x.reshape(*x.shape[: self.start_dim], -1)

    def backprop(self, dy, saved, need_dx):
        return dy.reshape(saved.shape)
