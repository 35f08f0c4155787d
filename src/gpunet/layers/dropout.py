"""Inverted dropout: in training, zero each element with probability p and scale the rest by
1/(1-p); in eval, the identity. Masks come from gpunet.random on the host, so a seeded run
draws the same masks on the CPU and on the GPU."""
from __future__ import annotations

from gpunet import random
from gpunet.backend import is_cupy_array, to_device
from gpunet.layers.base import Layer


class Dropout(Layer):
    def __init__(self, p: float = 0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        super().__init__(p=p)
        self.p = p
        self._mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        keep = random.generator().random(x.shape, dtype="float32") >= self.p
        mask = keep.astype(x.dtype) * (1.0 / (1.0 - self.p))
        self._mask = to_device(mask, "gpu" if is_cupy_array(x) else "cpu")
        return x * self._mask

    def backward(self, dy):
        return dy if self._mask is None else dy * self._mask
