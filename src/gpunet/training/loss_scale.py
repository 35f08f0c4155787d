"""fp16 dynamic loss scaling (fit(precision="fp16")), with torch.amp.GradScaler's rule, on the device.

fp16's range ends at 65504 and its smallest subnormal is 2**-24: a gradient smaller than that rounds to zero
where a product takes it as a 16-bit operand. So the loss gradient is multiplied by a scale before the backward
(every batch of an accumulated step by the same one), and the summed (all-reduced) gradients are multiplied by
1 / scale afterwards, in one pass per flat gradient buffer that also notes whether any result is inf or NaN.
Then clipping (of the unscaled gradients) and the optimizer's step, which is skipped when one was: the
parameters, the optimizer's state and its step count (Adam's bias corrections) stay as they were. Then the
scale: halved after a skipped step, doubled after growth_interval (2000) clean steps in a row; it starts at
2**16. bf16 has float32's exponent range, so bf16 and fp32 runs have no scaler.

On a GPU all of it is device work: the scale, the found flag, the counters and a ring of the last RING steps'
skipped flags live in one float32 array (`state`, words as kernels/optim.cu's LS_*), read by the kernels
(cuda_wrappers.unscale_check, loss_scale_update, the *_scaled optimizer updates), so a step never waits for
the host and a CUDA graph replays it (the graph reads and writes the same array). The host reads the array
where it reads the loss anyway (every 25 steps, before evaluations and saves: sync), which also corrects the
optimizer's host step_count (Optimizer.steps_applied). On the CPU (and for parameters other than float32,
which have no kernels) the same arithmetic runs on the host, which skips the optimizer's step itself: a CPU
fp16 run is the reference, with the same scales and the same skipped steps.

Costs on a GPU, per optimizer step: 1 launch per loss gradient (per output; with accumulation, per batch) for
the scale, 1 per trained flat group for unscale_check, 1 for loss_scale_update; the update kernels read the
state instead of arguments (no launch). The running train loss is summed on the host from the losses the
divergence watch reads anyway, so the plain step's add of the running loss goes (one launch fewer).
"""
from __future__ import annotations

import contextlib
import math

import numpy

from gpunet.backend import ops_for_device, to_numpy
from gpunet.layers.flat import flat_parameters

INIT_SCALE = 2.0**16
GROWTH_INTERVAL = 2000
GROWTH_FACTOR, BACKOFF_FACTOR = 2.0, 0.5
UNDERFLOW = 2.0**-24  # a scale below this: the gradients were inf or NaN at every scale tried (divergence)
RING = 64  # skipped flags kept on the device: more than the steps between two host reads (25 on a GPU)
# the state's words (kernels/optim.cu: LS_SCALE, ...); the counters are uint32
SCALE, FOUND, TRACKER, SKIPPED, APPLIED, ATTEMPTED, RING_START = 0, 1, 2, 3, 4, 5, 8
WORDS = RING_START + RING


class LossScaler:
    """The dynamic loss scale of one fit run (fit makes it for precision="fp16"): attach, then per step
    scale (each loss gradient), unscale, step (the optimizer, skipped when a gradient was not finite) and
    update; sync reads the device state on the host. The host values (scale, skipped, applied, tracker)
    are exact after a sync, and always on the CPU."""

    def __init__(self, init_scale: float = INIT_SCALE, growth_interval: int | None = None,
                 growth_factor: float = GROWTH_FACTOR, backoff_factor: float = BACKOFF_FACTOR):
        self.growth_interval = GROWTH_INTERVAL if growth_interval is None else int(growth_interval)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.scale_value = float(numpy.float32(init_scale))
        self.tracker = self.skipped = self.applied = self.attempted = 0
        self.found = False  # on the host: whether this step's gradients were not all finite
        self.ring = numpy.zeros(RING, dtype=bool)  # on the host: the last steps' skipped flags
        self.model = self.optimizer = self.state = None
        self.on_device = False

    # ---------------------------------------------------------------- the run
    def attach(self, model, optimizer, step: int) -> None:
        """Scale the steps of optimizer on model from loop step `step` on (the steps done so far: the ring's
        index); the applied count is the optimizer's step_count. On a GPU with float32 parameters the state
        goes to the device and the optimizer's kernels read it (optimizer.loss_scaler)."""
        self.model, self.optimizer = model, optimizer
        self.applied, self.attempted = int(optimizer.step_count), int(step)
        self.on_device = model.device == "gpu" and all(str(g.dtype) == "float32" for g in self._groups())
        if self.on_device:
            xp = ops_for_device("gpu").xp
            self.state = xp.asarray(self._words()).view("float32")
            optimizer.loss_scaler = self

    def detach(self) -> None:
        """The run ended: the host values read and the optimizer's kernels left as without scaling."""
        if self.on_device:
            self.sync()
            self.optimizer.loss_scaler = None
        self.on_device, self.state = False, None

    def _words(self) -> numpy.ndarray:
        words = numpy.zeros(WORDS, dtype=numpy.uint32)
        words[SCALE] = numpy.float32(self.scale_value).view(numpy.uint32)
        words[TRACKER], words[SKIPPED], words[APPLIED], words[ATTEMPTED] = (self.tracker, self.skipped, self.applied,
                                                                           self.attempted)
        words[RING_START:] = self.ring.astype(numpy.float32).view(numpy.uint32)
        return words

    def _groups(self) -> list:
        """The trained flat groups (the optimizer's layout: its parameter groups, frozen layers left out)."""
        return [g for g in flat_parameters(self.model, getattr(self.optimizer, "_tags", None)).groups if not g.frozen]

    # ---------------------------------------------------------------- a step
    def scale(self, grad):
        """The loss gradient (or each, a list for several outputs) multiplied by the scale, in place."""
        if isinstance(grad, (list, tuple)):
            return type(grad)(self.scale(g) for g in grad)
        if self.on_device:
            grad *= self.state[SCALE : SCALE + 1]  # (read at each replay of a graph)
        else:
            grad *= grad.dtype.type(self.scale_value)
        return grad

    def unscale(self) -> None:
        """The step's gradients (summed, all-reduced) times 1 / scale, and whether any is now inf or NaN: on
        the device one unscale_check per trained flat group; on the host the same products, then a check."""
        groups = self._groups()
        if self.on_device:
            from gpunet.backend import cuda_wrappers
            for group in groups:
                cuda_wrappers.unscale_check(group.grad, self.state)
            return
        self.found = False
        for group in groups:
            grad = group.grad
            grad *= grad.dtype.type(1.0 / self.scale_value)  # (the reciprocal in double, then rounded, as torch's)
            self.found = self.found or not bool(ops_for_device(group.device).xp.isfinite(grad).all())

    def clip(self, max_norm: float) -> None:
        """clip_grad_norm of the unscaled gradients. On the device the clipping leaves the gradients as they
        are when one was not finite (as the host, which does not clip then): a NaN scale would also reach the
        zero gaps between the parameters of a flat buffer, which no backward rewrites, and every later norm."""
        from gpunet.optim import clip_grad_norm

        if not self.on_device:
            if not self.found:
                clip_grad_norm(self.model, max_norm)
            return
        grads = [group.grad for group in flat_parameters(self.model).groups if not group.frozen]  # (clip_grad_norm's)
        if len(grads) == 1:  # (the kernel CupyOps.clip_grad_norm runs, reading the state)
            from gpunet.backend import cuda_wrappers
            cuda_wrappers.clip_grad_norm(grads[0], max_norm, self.state)
            return
        xp = ops_for_device("gpu").xp  # (several groups: Ops.clip_grad_norm's arithmetic, its scale 1 when found)
        total = xp.sqrt(sum(xp.dot(g64, g64) for g64 in (g.astype("float64") for g in grads)))
        scale = xp.where(self.state[FOUND] != 0, 1.0, xp.minimum(1.0, max_norm / (total + 1e-6)))
        for grad in grads:
            grad *= scale.astype(grad.dtype)

    def may_step(self) -> bool:
        """Whether clipping and the optimizer run their kernels this step: always on the device (where they
        are skipped), on the host unless a gradient was not finite."""
        return self.on_device or not self.found

    def step(self) -> None:
        """The optimizer's step: on the device its kernels skip it; on the host it is not taken."""
        if self.may_step():
            self.optimizer.step()

    def update(self) -> None:
        """After the step: the scale backed off (a skipped step) or grown, as torch.amp.GradScaler.update."""
        if self.on_device:
            from gpunet.backend import cuda_wrappers
            cuda_wrappers.loss_scale_update(self.state, self.growth_interval, self.growth_factor, self.backoff_factor,
                                            RING)
            return
        self.ring[self.attempted % RING], self.attempted = self.found, self.attempted + 1
        if self.found:
            self.scale_value = float(numpy.float32(self.scale_value * self.backoff_factor))
            self.tracker, self.skipped = 0, self.skipped + 1
            return
        self.applied, self.tracker = self.applied + 1, self.tracker + 1
        if self.tracker == self.growth_interval:
            with numpy.errstate(over="ignore"):  # (float32 overflow: inf, kept out)
                grown = numpy.float32(self.scale_value * self.growth_factor)
            if math.isfinite(grown):
                self.scale_value = float(grown)
            self.tracker = 0

    # ---------------------------------------------------------------- the host's reads
    def sync(self) -> None:
        """On the device: the state read on the host (one transfer; the host waits for the device) into the
        host values, and the optimizer's step_count corrected to the applied count. On the host: nothing to do."""
        if not self.on_device:
            return
        words = to_numpy(self.state).view(numpy.uint32)
        self.scale_value = float(words[SCALE : SCALE + 1].view(numpy.float32)[0])
        self.tracker, self.skipped, self.applied, self.attempted = (int(words[k]) for k in (TRACKER, SKIPPED, APPLIED,
                                                                                            ATTEMPTED))
        self.ring = words[RING_START:].view(numpy.float32) != 0
        self.optimizer.steps_applied(self.applied)

    def applied_steps(self) -> int:
        """The steps applied so far (read from the device: the optimizer asks when it makes its state)."""
        self.sync()
        return self.applied

    def skipped_at(self, steps) -> numpy.ndarray:
        """Whether each of steps (loop steps, counted from 1, among the last RING) was skipped."""
        self.sync()
        steps = numpy.asarray(steps, dtype=numpy.int64)
        if steps.size and (steps.min() <= self.attempted - RING or steps.max() > self.attempted):
            raise ValueError(f"loss scale: steps {steps.min()}..{steps.max()} are not among the last {RING} "
                             f"(the scaler is at step {self.attempted})")
        return self.ring[(steps - 1) % RING]

    def record(self) -> dict:
        """An evaluation record's entries: the scale, and the steps skipped since the run started."""
        self.sync()
        return {"loss_scale": self.scale_value, "skipped_steps": self.skipped}

    def underflowed(self, step: int) -> str | None:
        """The divergence message when the scale went below UNDERFLOW, else None (the host values: after a sync)."""
        if self.scale_value >= UNDERFLOW:
            return None
        exponent = math.frexp(self.scale_value)[1] - 1
        shown = f"2**{exponent}" if self.scale_value == 2.0**exponent else repr(self.scale_value)  # (0.0 after 2**-149)
        return (f"fp16 loss scale underflowed to {shown} (below 2**-24) by step {step}: the gradients were inf or "
                f"NaN at every scale tried ({self.skipped} steps skipped in all)")

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """JSON-able: what a resume needs besides the optimizer's step count and the loop's step."""
        self.sync()
        return {"scale": self.scale_value, "growth_tracker": self.tracker, "skipped_steps": self.skipped,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, saved: dict) -> None:
        """A saved state (before attach): the scale, the clean steps counted and the steps skipped."""
        self.scale_value = float(numpy.float32(saved["scale"]))
        self.tracker, self.skipped = int(saved["growth_tracker"]), int(saved["skipped_steps"])


def update_step(run) -> None:
    """A step's update after its gradients are combined across ranks: with a scaler (run.scaler) the
    gradients unscaled and checked, clipping (of the unscaled gradients), the optimizer (skipped when a
    gradient was not finite) and the scale's update; without one, clipping and the optimizer."""
    from gpunet.optim import clip_grad_norm

    scaler = run.scaler
    if scaler is None:
        if run.clip_norm:
            clip_grad_norm(run.model, run.clip_norm)
        run.optimizer.step()
        return
    scaler.unscale()
    if run.clip_norm:
        scaler.clip(run.clip_norm)
    scaler.step()
    scaler.update()


@contextlib.contextmanager
def attached(run):
    """While fit trains: run.scaler (if any) attached to its model and optimizer from the run's step."""
    if run.scaler is None:
        yield
        return
    run.scaler.attach(run.model, run.optimizer, run.state.step)
    try:
        yield
    finally:
        run.scaler.detach()
