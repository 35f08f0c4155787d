"""Gradient accumulation: `fit(..., accumulate=N)` and `gpunet train --accumulate N` take one optimizer
step per N batches of `batch_size`, equal to one step on those batches together.

A step's group is the batch of `N * batch_size` samples that `batch_size=N*batch_size` would take (the same
samples, in the same order, with the same augmentation: the group is gathered with one `data.get`), cut
into consecutive micro-batches of `batch_size`; the last group of an epoch may be short, and so may its
last micro-batch. Micro-batch i of n_i samples (of the group's n) scales its loss gradient by n_i / n
before its backward, and its parameter gradients are added into an accumulator laid out like the flat
gradient buffers (gpunet.layers.flat), so the step's gradient is sum_i (n_i / n) g_i, the mean-loss
gradient of the whole group, and its loss sum_i (n_i / n) loss_i, the group's mean loss. The sum is
copied into the gradient buffers before the all-reduce of data-parallel training (once per step, not
per micro-batch), clipping and the update, which see one step's gradient as without accumulation.
In fp16 every micro-batch's loss gradient is multiplied by the same loss scale: the scale changes only in
the step's update (gpunet.training.loss_scale).

What the adds cost, per trained flat group G (one per device and dtype, one more per parameter group of
the optimizer; frozen layers have none): each micro-batch launches 1 kernel more to scale its loss
gradient, G to add its gradients into the sums and 2 for its share of the step's loss (1 for the first);
each step G to zero the sums, G to copy them into the gradient buffers and, for a model with buffers
(batch norm), one copy of each buffer (what a dropped group puts back). The update, the clipping and the
running loss run once per step instead of once per batch.

Dropout and batch norm see micro-batches: each micro-batch draws its own dropout masks (from the random
step `step * N + i`, so a resumed or replayed run draws the same ones), and batch norm normalises each
micro-batch with its own statistics and updates its running averages once per micro-batch (N times a
step), so with either the step differs from one on the whole group. Without them the two agree to
rounding (tests/test_accumulate.py).

An interrupted group is dropped: a Ctrl-C, SIGTERM or SIGHUP between two micro-batches stops there (with
several ranks: after the step, where the ranks agree), the sums are thrown away, the buffers put back as
they were at the group's start, and last.safetensors saved at the step before it; a resume takes the
group again from its first sample. Checkpoints only ever hold whole steps.
"""
from __future__ import annotations

import numpy

from gpunet import random
from gpunet.backend import ops_for_device, to_device
from gpunet.layers import inputs as arrays
from gpunet.errors import out_of_memory
from gpunet.layers.flat import flat_parameters


class Accumulator:
    """The sums of one step's micro-batch gradients, one buffer per trained flat gradient buffer."""

    def __init__(self, model, optimizer, keep_buffers: bool):
        self.model, self.tags = model, getattr(optimizer, "_tags", None)  # (the optimizer's layout: no rebuild)
        self.keep_buffers = keep_buffers and len(model.buffers) > 0
        self.flat, self.groups, self.sums, self.kept = None, [], [], {}

    def begin(self) -> None:
        """A new group: the sums zeroed and the model's buffers kept (to put back if the group is dropped)."""
        flat = flat_parameters(self.model, self.tags)
        if flat is not self.flat:  # laid out again (a new model layout, a layer frozen): sums to match
            self.flat, self.groups = flat, [group for group in flat.groups if not group.frozen]
            self.sums = [ops_for_device(g.device).xp.zeros(g.size, dtype=g.dtype) for g in self.groups]
        for total in self.sums:
            total.fill(0)
        if self.keep_buffers:
            buffers = self.model.buffers
            if set(self.kept) != set(buffers) or any(self.kept[k].shape != buffers[k].shape or
                                                   type(self.kept[k]) is not type(buffers[k]) for k in buffers):
                self.kept = {name: buffers[name].copy() for name in buffers}
            else:
                for name, kept in self.kept.items():
                    kept[...] = buffers[name]

    def add(self) -> None:
        """The micro-batch's parameter gradients (already scaled by its share) added into the sums."""
        for group, total in zip(self.groups, self.sums):
            total += group.grad

    def gradients(self) -> None:
        """The step's gradient: the sums copied into the flat gradient buffers."""
        for group, total in zip(self.groups, self.sums):
            group.grad[...] = total

    def put_back(self) -> None:
        """The model's buffers as they were at the group's start (a dropped group)."""
        buffers = self.model.buffers
        for name, kept in self.kept.items():
            buffers[name][...] = kept


def scaled(grad, weight):
    """The loss gradient grad scaled in place by weight: a Python float (eager), or a one-element
    device array (a CUDA graph's record, read at each replay)."""
    if isinstance(grad, (list, tuple)):  # (several outputs: each output's gradient)
        return type(grad)(scaled(g, weight) for g in grad)
    grad *= grad.dtype.type(weight) if isinstance(weight, float) else weight
    return grad


def micro_batches(idx, batch_size: int) -> list:
    """The consecutive micro-batches of a group's indices (the last may be short)."""
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def step(run, idx):
    """One optimizer step on the group idx (the global batch of N micro-batches): its micro-batches'
    gradients summed, then the update; returns the step's mean loss. Raises TrainingInterrupted (the
    group dropped) when a stop signal came between two of its micro-batches."""
    s, model, parallel, n = run.state, run.model, run.parallel, run.accumulate
    micro = micro_batches(idx, run.batch_size)
    shares = [parallel.share(m) for m in micro]  # each rank's share of every micro-batch
    mine, total = numpy.concatenate(shares), len(idx)
    ended = s.epoch + 1 if s.sample + total >= len(run.data) else None
    with out_of_memory(model.device, f"in step {s.step + 1}", len(shares[0]), _OPTION):
        xs, ys = run.data.get(mine, numpy.random.default_rng(parallel.stream(run.seed, s.epoch, s.batch)))
    run.accumulator.begin()
    loss, start = None, 0
    for i, share in enumerate(shares):
        random.set_step(s.step * n + i)  # each micro-batch its own masks
        if len(share):  # (a micro-batch smaller than the world leaves a rank no sample)
            rows = slice(start, start + len(share))
            xb, yb, weight = arrays.take(xs, rows), arrays.take(ys, rows), len(share) / total
            start += len(share)
            with out_of_memory(model.device, f"in batch {i + 1} of step {s.step + 1}", len(share), _OPTION):
                if run.graph is not None and run.graph.active:
                    value = run.graph.run(xb, yb, weight)
                else:
                    value = run._micro_step(*(arrays.each(lambda a: to_device(a, model.device), b) for b in (xb, yb)),
                                            weight)
            part = value * weight
            loss = part if loss is None else loss + part
            run.callbacks.step(s.step + 1, value, ended, hooks=("on_batch_end",))
        if i + 1 < len(shares) and parallel.world_size == 1 and run.interrupted is not None \
                and run.interrupted.is_set():
            run.accumulator.put_back()
            run._interrupt(run.interrupted.signum, f" (batches 1 to {i + 1} of the {len(shares)} of step {s.step + 1} "
                                                   "dropped: a resume takes that step from its first batch)")
    with out_of_memory(model.device, f"in step {s.step + 1}", len(shares[0]), _OPTION):
        if run.graph is not None and run.graph.active:
            run.graph.run_update()
            value = loss
        else:
            value = run._update_step(loss, len(mine), total)
    run.add_running(value)
    s.step, s.batch, s.sample = s.step + 1, s.batch + 1, s.sample + total
    return value


_OPTION = "--batch-size, or batch_size= of gn.fit (--accumulate / accumulate= keeps the step's size)"
