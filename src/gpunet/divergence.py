"""Noticing that a run diverged (a loss or a weight became NaN or infinite), exactly and cheaply.

On the CPU the loss of each step is a host number, so the first bad step is known at once. On
a GPU, reading the loss each step would make the host wait for the device, so the watch keeps
the first bad step in a device scalar, updated by one tiny elementwise kernel per step (no
transfer), and the host reads it where it reads the loss anyway (every few steps, before each
evaluation, the last one included, and on Ctrl-C): the report names the exact step without a
synchronisation per step.
"""
from __future__ import annotations

import math

import numpy

from gpunet.backend import ops_for


class DivergenceWatch:
    """The first step whose loss was not finite, and that loss (None while there is none)."""

    def __init__(self, xp=numpy):
        self.xp = xp
        self._host = None
        if xp is not numpy:
            self._step = xp.zeros((), dtype="int64")  # 0: none yet (steps count from 1)
            self._value = xp.zeros((), dtype="float64")

    def observe(self, loss, step: int) -> None:
        if self.xp is numpy:
            if self._host is None and not math.isfinite(float(loss)):
                self._host = (step, float(loss))
            return
        xp = self.xp
        first = (self._step == 0) & ~xp.isfinite(loss)
        self._step = xp.where(first, numpy.int64(step), self._step)
        self._value = xp.where(first, loss.astype("float64"), self._value)

    def first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or None. A host read (waits on a GPU)."""
        if self.xp is numpy:
            return self._host
        step = int(self._step)
        return (step, float(self._value)) if step else None


def first_non_finite_tensor(model) -> str | None:
    """The name of the first parameter or buffer holding NaN or Inf, or None (one reduction per
    array, read on the host: call it where the host waits anyway, e.g. before saving)."""
    for name, value in model.state_dict().items():
        if getattr(value, "dtype", None) is None or value.dtype.kind not in "fc":
            continue
        if not bool(ops_for(value, op="isfinite").xp.isfinite(value).all()):
            return name
    return None
