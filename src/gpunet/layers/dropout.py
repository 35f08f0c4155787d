"""Inverted dropout: in training, zero each element with probability p and scale the rest by
1/(1-p); in eval, the identity. Masks come from gpunet.random on the host, so a seeded run
draws the same masks on the CPU and on the GPU."""
from __future__ import annotations

from gpunet import random
from gpunet.backend import is_cupy_array, to_device
from gpunet.layers.base import Layer, register


@register("Dropout")
class Dropout(Layer):
    def __init__(self, p: float = 0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        super().__init__(p=p)
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.save_for_backward(mask=None)
            return x
        keep = random.generator().random(x.shape, dtype="float32") >= self.p
        mask = to_device(keep.astype(x.dtype) * (1.0 / (1.0 - self.p)), "gpu" if is_cupy_array(x) else "cpu")
        self.save_for_backward(mask=mask)
        return x * mask

    def backprop(self, dy, saved, need_dx):
        return dy if saved.mask is None else dy * saved.mask
