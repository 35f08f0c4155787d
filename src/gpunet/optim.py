"""Optimizers (SGD, Adam, AdamW), learning-rate schedules and gradient clipping.

Optimizers update the model's flat buffers (gpunet.layers.flat): every parameter of a device and
dtype in one launch on the GPU, one vectorised pass on the CPU. Their state (momentum buffers, Adam's
moments) lives in buffers of the same layout; `state[name][slot]` are views of them, so state_dict
and checkpoints keep their per-parameter names and PyTorch's semantics. The model's buffers are
looked up at every step (so `.to(device)` or `load_state_dict` after construction is fine: state
of the same layout is kept on the same device, and starts from zero on another, as it always did).

Parameter groups (`groups={"fc1.*": {"lr": 1e-4, "weight_decay": 0.0}}`): glob patterns (fnmatch) over
the parameter names, the first that matches a name wins, the rest take the optimizer's own settings.
Each group is a flat group of its own (one more launch per group). A schedule scales every rate by
the same factor: a group's rate is its lr * optimizer.lr / the optimizer's lr when made. Parameters of
frozen layers (layer.freeze()) are flat groups of their own that step() skips: no state, no decay.

fp16 loss scaling (gpunet.training.loss_scale): while fit trains in fp16 on a GPU, `loss_scaler` is its scaler,
and the update kernels read its device state: a step whose gradients were not finite writes nothing there, and
Adam's step (its bias corrections) is the count of applied steps kept there, so a skipped step advances
neither; the host's step_count counts the steps attempted until the scaler's next host read corrects it
(steps_applied). On the CPU the scaler skips the step itself, so step_count is the applied count throughout.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

from gpunet import validate
from gpunet.backend import Array, ops_for, ops_for_device, to_device, to_numpy
from gpunet.backend.ops import adam_scalars
from gpunet.layers.base import Layer
from gpunet.layers.flat import flat_parameters

__all__ = ["Adam", "AdamW", "CosineLR", "OPTIMIZERS", "Optimizer", "SGD", "StepLR", "clip_grad_norm"]


class LossScaled(NamedTuple):
    """What a loss-scaled step hands the GPU update kernels as their `scalars` (cuda_wrappers.sgd_update /
    adam_update): the per-step scalars (None: the arguments), the scaler's device state and first_at (the
    applied count at which fresh momentum buffers were made: the step that applies first initialises them)."""

    scalars: Any
    loss_scale_state: Any
    first_at: int


class Optimizer:
    # Whether _update hands device_scalars to its kernels (then a CUDA graph may replay it): an
    # optimizer that passes its learning rate as an argument would have it frozen at capture.
    reads_device_scalars = False
    model: Layer
    lr: float
    hyper: dict[str, Any]
    step_count: int
    _buffers: Any
    _update: Callable[..., None]  # each optimizer's update of one flat group

    def __init__(self, model: Layer, lr: float, groups: dict | None = None, **hyper: Any) -> None:
        name = type(self).__name__
        if not isinstance(model, Layer):  # gn.optim.Adam(lr) without the model, or a model's name
            raise TypeError(f"{name}: the first argument must be the model it updates (a gpunet layer or model), "
                            f"got {type(model).__name__}")
        _check_lr(name, lr)
        for key, value in hyper.items():
            _check_setting(name, key, value)
        self.model, self.lr, self.hyper = model, float(lr), hyper
        self.initial_lr = self.lr  # a group's rate is its lr times lr / initial_lr (what a schedule did to lr)
        self._set_groups(groups)
        self.step_count = 0
        self.device_scalars = None  # set while a CUDA graph captures a step: the kernels read step_scalars() there
        self.loss_scaler = None  # fit's fp16 loss scaler on a GPU (gpunet.training.loss_scale): kernels read its state
        self._fresh_at = 0  # the applied step count when the state buffers were last made
        self.state: dict[str, dict] = {}  # name -> slot -> array (views of the flat state buffers)
        self._buffers = None  # (the FlatParameters they are laid out for, [{slot: buffer} per group])
        self._fresh: set[str] = set()  # parameters whose state started from zero at the last rebuild
        flat_parameters(model)  # the model's params and grads become views of its flat buffers now

    def _set_groups(self, groups: dict | None) -> None:
        """Check groups and tag each parameter with its group (1 + the first pattern that matches, else 0)."""
        name, groups = type(self).__name__, {} if groups is None else groups
        if not isinstance(groups, dict):
            raise TypeError(f"{name}: groups must be a dict of pattern -> settings, got {type(groups).__name__}")
        names = list(self.model.params)
        self.groups: dict[str, dict] = {}
        for pattern, settings in groups.items():
            where = f"{name}: groups[{pattern!r}]"
            if not isinstance(pattern, str) or not isinstance(settings, dict):
                raise TypeError(f"{where}: a group is a name pattern (str) and a dict of settings, got "
                                f"{type(pattern).__name__} and {type(settings).__name__}")
            for key, value in settings.items():
                if key == "lr":
                    _check_lr(where, value)
                elif key in self.hyper:
                    _check_setting(where, key, tuple(value) if key == "betas" else value)
                else:
                    raise ValueError(f"{where}: unknown setting {key!r} (a group sets lr or "
                                     f"{', '.join(sorted(self.hyper))})")
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"{where}: the pattern matches no parameter of the {type(self.model).__name__} "
                                 f"(its parameters: {_listed(names)})")
            self.groups[pattern] = {k: tuple(v) if k == "betas" else v for k, v in settings.items()}
        patterns = list(self.groups)
        self._tags = tuple(next((1 + i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(n, p)), 0)
                           for n in names)

    def _settings(self, tag: int) -> tuple[float, dict]:
        """(learning rate, hyperparameters) of parameter group tag (0: the optimizer's own)."""
        if tag == 0:
            return self.lr, self.hyper
        own = list(self.groups.values())[tag - 1]
        lr = own["lr"] * (self.lr / self.initial_lr) if "lr" in own else self.lr
        return lr, {**self.hyper, **{k: v for k, v in own.items() if k != "lr"}}

    def _scalars(self, tag: int):
        """The device scalars group tag's kernels read while a CUDA graph captures (else None); with a
        loss scaler, those wrapped with its device state (LossScaled)."""
        scalars = self.device_scalars
        scalars = scalars[tag] if isinstance(scalars, (list, tuple)) else scalars
        if self.loss_scaler is not None:
            return LossScaled(scalars, self.loss_scaler.state, self._fresh_at)
        return scalars

    def slots(self) -> tuple[str, ...]:
        """The names of the state this optimizer keeps per parameter."""
        return ()

    def _slots(self, tag: int) -> tuple[str, ...]:
        """The state kept for the parameters of group tag (SGD's momentum may be a group's own)."""
        return self.slots()

    def step_scalars(self, tag: int = 0) -> list[float]:
        """What the update kernels read from device_scalars in the next step (step_count + 1) of a
        replayed CUDA graph, whose kernel arguments stay as captured: the learning rate (of group tag)."""
        return [self._settings(tag)[0]]

    def check_trains(self) -> None:
        """Refuse an optimizer with nothing to update: every parameter of its model frozen."""
        if self.model.params and all(group.frozen for group in flat_parameters(self.model, self._tags).groups):
            raise ValueError(f"{type(self).__name__}: every parameter of the {type(self.model).__name__} is frozen "
                             "(layer.freeze()), so training would change nothing; unfreeze the layers to train "
                             "(layer.unfreeze())")

    def step(self) -> None:
        self.step_count += 1
        flat = flat_parameters(self.model, self._tags)
        for group, state in zip(flat.groups, self._state_buffers(flat)):
            if not group.frozen:  # (a frozen layer's parameters: no update, no state, no weight decay)
                self._update(group, state)
        if self.loss_scaler is None:  # (with one, the state stays fresh until a step is known to have applied)
            self._fresh.clear()

    def steps_applied(self, count: int) -> None:
        """A loss scaler's host read: count steps were applied so far (not skipped). The host's step_count
        becomes that, and state made fresh before the first of them is no longer fresh."""
        self.step_count = count
        if count > self._fresh_at:
            self._fresh.clear()

    def _state_buffers(self, flat) -> list[dict]:
        """The state buffers laid out as flat's groups: kept while the layout and device are the
        same, else rebuilt with each parameter's state copied in (zero where it has none, or has
        it on another device, or of another shape)."""
        if self._buffers is not None and self._buffers[0] is flat:
            return self._buffers[1]
        # the applied steps before this one (counted already); a loss scaler on a GPU reads them from the device,
        # and the host's count goes on from there
        if self.loss_scaler is None:
            self._fresh_at = self.step_count - 1
        else:
            self._fresh_at = self.loss_scaler.applied_steps()
            self.step_count = self._fresh_at + 1
        buffers = []
        for group in flat.groups:
            xp = ops_for_device(group.device).xp
            state: dict = {}
            buffers.append(state)
            if group.frozen:
                continue
            for slot in self._slots(group.tag):
                buffer = state[slot] = xp.zeros(group.size, dtype=group.dtype)
                for i, name in enumerate(group.names):
                    view, old = group.view(buffer, i), self.state.get(name, {}).get(slot)
                    if old is not None and old.shape == view.shape and type(old) is type(view):
                        view[...] = old
                    elif old is None:  # (state on another device restarts from zero, but is not new)
                        self._fresh.add(name)
                    self.state.setdefault(name, {})[slot] = view
        self._buffers = (flat, buffers)
        return buffers

    def state_dict(self) -> tuple[dict, dict]:
        """(arrays keyed 'name/slot' as NumPy, JSON-able hyperparameters and step count)."""
        arrays = {f"{name}/{slot}": to_numpy(a) for name, slots in self.state.items() for slot, a in slots.items()}
        meta = {"type": type(self).__name__, "lr": self.lr, "step": self.step_count, **self.hyper}
        if self.groups:  # (only with groups: the metadata saved before groups existed stays the same)
            meta.update(groups=self.groups, initial_lr=self.initial_lr)
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        device = self.model.device
        self.step_count, self.lr = int(meta["step"]), float(meta["lr"])
        if "groups" in meta:
            self.initial_lr = float(meta["initial_lr"])
            self._set_groups(meta["groups"])
        self.state, self._buffers = {}, None  # the flat buffers are rebuilt from these at the next step
        for key, value in arrays.items():
            name, _, slot = key.rpartition("/")
            self.state.setdefault(name, {})[slot] = to_device(value, device)


class SGD(Optimizer):
    """torch.optim.SGD: L2 weight decay added to the gradient, momentum, Nesterov."""

    reads_device_scalars = True

    def __init__(self, model: Layer, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 dampening: float = 0.0, groups: dict | None = None) -> None:
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(model, lr, groups, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                         dampening=dampening)

    def slots(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.hyper["momentum"] else ()

    def _slots(self, tag: int) -> tuple[str, ...]:
        return ("momentum_buffer",) if self._settings(tag)[1]["momentum"] else ()

    def _update(self, group, state):
        lr, h = self._settings(group.tag)
        velocity = state.get("momentum_buffer")
        fresh = [name in self._fresh for name in group.names]
        args = (lr, h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"])
        ops, scalars = ops_for(group.param, group.grad, op="SGD.step"), self._scalars(group.tag)
        if velocity is None or all(fresh) or not any(fresh):  # one pass over every parameter
            ops.sgd_update(group.param, group.grad, velocity, *args, velocity is not None and all(fresh), scalars)
            return
        for i, first in enumerate(fresh):  # some momentum loaded, some new (a partial state_dict): one by one
            ops.sgd_update(group.view(group.param, i), group.view(group.grad, i), group.view(velocity, i), *args, first,
                           scalars)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient)."""

    decoupled = False
    reads_device_scalars = True

    def __init__(self, model: Layer, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, groups: dict | None = None) -> None:
        super().__init__(model, lr, groups, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def slots(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, group, state):
        lr, h = self._settings(group.tag)
        ops_for(group.param, group.grad, op=f"{type(self).__name__}.step").adam_update(
            group.param, group.grad, state["exp_avg"], state["exp_avg_sq"],
            lr, h["betas"][0], h["betas"][1], h["eps"], h["weight_decay"], self.decoupled, self.step_count,
            self._scalars(group.tag))

    def step_scalars(self, tag: int = 0) -> list[float]:
        """The learning rate and the bias corrections of the next step (see Optimizer.step_scalars)."""
        lr, h = self._settings(tag)
        return list(adam_scalars(lr, h["betas"][0], h["betas"][1], self.step_count + 1))


class AdamW(Adam):
    """torch.optim.AdamW: weight decay applied to the weights, decoupled from the gradient."""

    decoupled = True

    def __init__(self, model: Layer, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, groups: dict | None = None) -> None:
        super().__init__(model, lr, betas, eps, weight_decay, groups)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def _check_lr(where: str, lr: float) -> None:  # (anything a user passes: checked here)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{where}: lr must be positive and finite, got {lr!r}")


def _check_setting(where: str, key: str, value) -> None:
    if key in ("momentum", "weight_decay", "dampening"):
        validate.finite(f"{where}: {key}", value, low=0)
    elif key == "eps":
        validate.finite(f"{where}: eps", value, low=0, low_open=True)
    elif key == "betas":
        if len(value) != 2:
            raise ValueError(f"{where}: betas must be two numbers, got {value!r}")
        for i, beta in enumerate(value):
            validate.finite(f"{where}: betas[{i}]", beta, low=0, high=1, high_open=True)


def _listed(names: list) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


class StepLR:
    """Multiply the learning rate by gamma every step_size optimizer steps, as
    torch.optim.lr_scheduler.StepLR stepped once per optimizer step (fit calls step() after each)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        validate.positive_int(f"{type(self).__name__}: step_size", step_size)
        validate.finite(f"{type(self).__name__}: gamma", gamma, low=0, low_open=True)
        self.optimizer, self.step_size, self.gamma = optimizer, step_size, gamma
        self.base_lr, self.count = optimizer.lr, 0  # count: optimizer steps taken

    def lr_at(self, count: int) -> float:
        """The learning rate of optimizer step `count` (0 is the first)."""
        return self.base_lr * self.gamma ** (count // self.step_size)

    def step(self) -> None:
        self.count += 1
        self.optimizer.lr = self.lr_at(self.count)


class CosineLR(StepLR):
    """Optional linear warm-up over `warmup` optimizer steps (base_lr * (k+1) / warmup at step k),
    then cosine annealing from the base rate to eta_min over the remaining t_max - warmup steps, as
    torch's CosineAnnealingLR closed form (after LinearLR, in a SequentialLR, with warm-up); eta_min
    from step t_max on. t_max counts every optimizer step of the run, warm-up included."""

    def __init__(self, optimizer: Optimizer, t_max: int, eta_min: float = 0.0, warmup: int = 0) -> None:
        validate.finite("CosineLR: eta_min", eta_min, low=0)
        validate.non_negative_int("CosineLR: warmup", warmup)
        if isinstance(t_max, bool) or not isinstance(t_max, int):
            raise ValueError(f"CosineLR: t_max must be an integer, got {t_max!r}")
        if warmup and warmup >= t_max:
            raise ValueError(f"CosineLR: warmup ({warmup} steps) must be shorter than t_max ({t_max} steps)")
        super().__init__(optimizer, step_size=1)
        self.t_max, self.eta_min, self.warmup = max(1, t_max), eta_min, warmup
        if warmup:
            optimizer.lr = self.lr_at(0)

    def lr_at(self, count: int) -> float:
        if count < self.warmup:
            return self.base_lr * (count + 1) / self.warmup
        span = self.t_max - self.warmup
        t = min(count - self.warmup, span)
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t / span)) / 2


def clip_grad_norm(model: Layer, max_norm: float) -> Array | float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm
    before clipping as a 0-d array (on the device: no host synchronisation). One reduction over
    the model's flat gradient buffer; on a GPU the scale is computed and applied on the device."""
    validate.finite("clip_grad_norm: max_norm", max_norm, low=0, low_open=True)
    groups = [group for group in flat_parameters(model).groups if not group.frozen]  # (frozen: not trained)
    if not groups:
        return 0.0
    grads = [group.grad for group in groups]
    return ops_for(*grads, op="clip_grad_norm").clip_grad_norm(grads, max_norm)
