"""Data-parallel training as the fit loop runs it: every rank holds the whole model, takes its share
of each global batch, and the ranks' gradients are summed with one all-reduce of the flat gradient
buffer per step, each weighted by its share of the batch's samples, so a step of N ranks is the step
one process takes on the whole batch (to float32 rounding), short or uneven batches included. With
gradient accumulation each rank takes its share of every batch of the step and the all-reduce comes once,
after the last of them.

Random streams are per rank: a batch's augmentation is seeded by (seed, epoch, batch, rank) and the
dropout key by (seed, rank). BatchNorm keeps its batch statistics and running averages per rank (as
PyTorch DDP does by default); rank 0's are the ones saved.
"""
from __future__ import annotations

import numpy

from gpunet import random
from gpunet.backend import ops_for_device
from gpunet.layers.flat import flat_parameters
from gpunet.layers import inputs as arrays
from gpunet.losses import report_keys


class Replicas:
    """The fit loop's view of a world of ranks; with world size 1 every method is the identity."""

    def __init__(self, world):
        self.world, self.rank, self.world_size = world, world.rank, world.world_size

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files and reports progress (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        self.world.barrier()

    def share(self, items):
        """This rank's contiguous part of items (a batch's indices): the ranks' parts differ by at most
        one item, and a rank gets none when there are fewer items than ranks."""
        if self.world_size == 1:
            return items
        n = len(items)
        return items[n * self.rank // self.world_size : n * (self.rank + 1) // self.world_size]

    def stream(self, *words) -> list:
        """The seed words of a random stream, with this rank's number added when there are several."""
        return list(words) + ([self.rank] if self.world_size > 1 else [])

    def start(self, model, seed: int) -> None:
        """Give every rank rank 0's parameters, and this rank its dropout key derived from (seed, rank)."""
        if self.world_size == 1:
            return
        for group in flat_parameters(model).groups:
            self.world.broadcast(group.param, 0)
        low, high = numpy.random.SeedSequence([seed, self.rank]).generate_state(2, dtype=numpy.uint32)
        random.set_state({**random.get_state(), "dropout_key": int(low) | int(high) << 32})

    def combine(self, model, loss, count: int, total: int, weighted: bool = False):
        """Sum the ranks' gradients, each weighted by count / total (its samples of the batch's total), in
        place; returns the batch's mean loss (the same on every rank). loss is this rank's mean loss
        over its count samples (ignored when count is 0: the rank had no sample this step).
        weighted: the gradients and the loss are this rank's already weighted by its samples of the step's
        (accumulated batches: gpunet.training.accumulate), and only summed (a rank without a sample has
        zero gradients then)."""
        if self.world_size == 1:
            return loss
        weight = 1.0 if weighted else count / total
        for group in flat_parameters(model).groups:
            grad = group.grad  # (a view: the layers' gradients change with it)
            if count and not weighted:
                grad *= grad.dtype.type(weight)
            elif not count and not weighted:
                grad.fill(0)
            self.world.all_reduce(grad)
        xp = ops_for_device(model.device).xp
        mean = xp.zeros(1, dtype=xp.float64)
        if count:
            mean += xp.asarray(loss, dtype=xp.float64) * weight
        return self.world.all_reduce(mean).reshape(())

    def evaluate(self, evaluate, model, x, y, loss) -> dict:
        """evaluate(model, x, y, loss, None) over the whole of (x, y): each rank evaluates its share and
        the sums are all-reduced, so every rank gets the same result. x and y may be lists (several inputs,
        several outputs: loss a list), whose means (gpunet.losses.report_keys) are summed alike."""
        if self.world_size == 1:
            return evaluate(model, x, y, loss, None)
        n, keys = arrays.samples(x), report_keys(loss)
        low, high = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        sums = numpy.zeros(len(keys))
        if high > low:
            part = evaluate(model, arrays.take(x, slice(low, high)), arrays.take(y, slice(low, high)), loss, None)
            sums[:] = [part[key] * (high - low) for key in keys]
        self.world.all_reduce(sums)
        return {**{key: float(total / n) for key, total in zip(keys, sums)}, "samples": int(n)}

    def any(self, flag: bool, now: bool = True) -> bool:
        """Whether flag is set on any rank. With several ranks it is asked only when now is true (the
        same steps on every rank), else False: on a GPU the loop asks only where the host waits anyway."""
        if self.world_size == 1:
            return bool(flag)
        if not now:
            return False
        return bool(self.world.all_reduce(numpy.array([int(bool(flag))], dtype=numpy.int32), "max")[0])
