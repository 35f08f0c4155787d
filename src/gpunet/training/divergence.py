"""Noticing that a run diverged (a loss or a weight became NaN or infinite), exactly and cheaply.

On the CPU the loss of each step is a host number, so the first bad step is known at once. On
a GPU, reading the loss each step would make the host wait for the device, so the watch only
keeps each step's 0-d loss array (no kernel, no transfer) and reads them all, stacked, in one
transfer where the host reads the loss anyway (every few steps, before each evaluation, the last
one included, and on Ctrl-C): the report names the exact step without a synchronisation per step.

With fp16 loss scaling a step whose gradients overflowed is skipped, and its loss may be inf: on_read, given
the steps and losses of each read, says which of them the scaler skipped, and those are not divergence.
"""
from __future__ import annotations

import math

import numpy

from gpunet.backend import ops_for, to_numpy


class DivergenceWatch:
    """The first step whose loss was not finite, and that loss (None while there is none)."""

    def __init__(self, xp=numpy, on_read=None):
        self.xp = xp
        self.on_read = on_read  # on_read(steps, losses as float64) -> which steps were skipped (or None: none)
        self._first = None  # (step, loss) once known
        self._pending = []  # on a GPU: (step, 0-d loss array) not read yet

    @property
    def pending(self) -> int:
        """The losses observed and not read yet (on a GPU)."""
        return len(self._pending)

    def observe(self, loss, step: int) -> None:
        if self._first is not None:
            return
        if self.xp is numpy:
            value = float(loss)
            if not self._skipped([step], numpy.array([value]))[0] and not math.isfinite(value):
                self._first = (step, value)
        else:
            self._pending.append((step, loss))

    def _skipped(self, steps, losses) -> numpy.ndarray:
        """Which of steps a loss scaler skipped (on_read: it also sees every loss read, once)."""
        skipped = self.on_read(steps, losses) if self.on_read is not None else None
        return numpy.zeros(len(steps), dtype=bool) if skipped is None else numpy.asarray(skipped, dtype=bool)

    def first_bad(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss, or None. On a GPU one stack and one host read
        of the losses observed since the last call (the host waits for the device here)."""
        if self._first is None and self._pending:
            losses = to_numpy(self.xp.stack([loss for _, loss in self._pending])).astype("float64")
            bad = numpy.flatnonzero(~numpy.isfinite(losses) & ~self._skipped([s for s, _ in self._pending], losses))
            if bad.size:
                self._first = (self._pending[bad[0]][0], float(losses[bad[0]]))
            self._pending.clear()
        return self._first


def first_non_finite_tensor(model) -> str | None:
    """The name of the first parameter or buffer holding NaN or Inf, or None (one reduction per
    array, read on the host: call it where the host waits anyway, e.g. before saving)."""
    for name, value in model.state_dict().items():
        if getattr(value, "dtype", None) is None or value.dtype.kind not in "fc":
            continue
        if not bool(ops_for(value, op="isfinite").xp.isfinite(value).all()):
            return name
    return None
