"""Optimizers (SGD, Adam, AdamW), learning-rate schedules and gradient clipping.

Optimizers read `model.params` and `model.grads` at every step (so `.to(device)` after
construction is fine) and keep their state per parameter name, with PyTorch's semantics.
"""
from __future__ import annotations

import math
import numbers

from gpunet import validate
from gpunet.backend import ops_for, to_device, to_numpy


class Optimizer:
    def __init__(self, model, lr: float, **hyper):
        name = type(self).__name__
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"{name}: lr must be positive and finite, got {lr!r}")
        for key, value in hyper.items():
            if key in ("momentum", "weight_decay", "dampening"):
                validate.finite(f"{name}: {key}", value, low=0)
            elif key == "eps":
                validate.finite(f"{name}: eps", value, low=0, low_open=True)
            elif key == "betas":
                if len(value) != 2:
                    raise ValueError(f"{name}: betas must be two numbers, got {value!r}")
                for i, beta in enumerate(value):
                    validate.finite(f"{name}: betas[{i}]", beta, low=0, high=1, high_open=True)
        self.model, self.lr, self.hyper = model, float(lr), hyper
        self.step_count = 0
        self.state: dict[str, dict] = {}

    def step(self) -> None:
        self.step_count += 1
        grads = self.model.grads
        for name, param in self.model.params.items():
            self._update(name, param, grads[name])

    def _slot(self, name, param, slot):
        slots = self.state.setdefault(name, {})
        if slot not in slots or slots[slot].shape != param.shape or type(slots[slot]) is not type(param):
            slots[slot] = ops_for(param).zeros(param.shape, dtype=param.dtype)
        return slots[slot]

    def state_dict(self) -> tuple[dict, dict]:
        """(arrays keyed 'name/slot' as NumPy, JSON-able hyperparameters and step count)."""
        arrays = {f"{name}/{slot}": to_numpy(a) for name, slots in self.state.items() for slot, a in slots.items()}
        return arrays, {"type": type(self).__name__, "lr": self.lr, "step": self.step_count, **self.hyper}

    def load_state_dict(self, arrays: dict, meta: dict) -> None:
        device = self.model.device
        self.step_count, self.lr = int(meta["step"]), float(meta["lr"])
        self.state = {}
        for key, value in arrays.items():
            name, _, slot = key.rpartition("/")
            self.state.setdefault(name, {})[slot] = to_device(value, device)


class SGD(Optimizer):
    """torch.optim.SGD: L2 weight decay added to the gradient, momentum, Nesterov."""

    def __init__(self, model, lr, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(model, lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                         dampening=dampening)

    def _update(self, name, param, grad):
        h = self.hyper
        first = name not in self.state
        velocity = self._slot(name, param, "momentum_buffer") if h["momentum"] else None
        ops_for(param, grad, op="SGD.step").sgd_update(
            param, grad, velocity, self.lr, h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], first)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient)."""

    decoupled = False

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(model, lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _update(self, name, param, grad):
        h = self.hyper
        ops_for(param, grad, op=f"{type(self).__name__}.step").adam_update(
            param, grad, self._slot(name, param, "exp_avg"), self._slot(name, param, "exp_avg_sq"),
            self.lr, h["betas"][0], h["betas"][1], h["eps"], h["weight_decay"], self.decoupled, self.step_count)


class AdamW(Adam):
    """torch.optim.AdamW: weight decay applied to the weights, decoupled from the gradient."""

    decoupled = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(model, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


class StepLR:
    """Multiply the learning rate by gamma every step_size calls of step()."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        validate.positive_int(f"{type(self).__name__}: step_size", step_size)
        validate.finite(f"{type(self).__name__}: gamma", gamma, low=0, low_open=True)
        self.optimizer, self.step_size, self.gamma = optimizer, step_size, gamma
        self.base_lr, self.count = optimizer.lr, 0

    def lr_at(self, count: int) -> float:
        return self.base_lr * self.gamma ** (count // self.step_size)

    def step(self) -> None:
        self.count += 1
        self.optimizer.lr = self.lr_at(self.count)


class CosineLR(StepLR):
    """Cosine annealing from the base rate to eta_min over t_max calls of step(), as
    torch.optim.lr_scheduler.CosineAnnealingLR's closed form; optional linear warm-up."""

    def __init__(self, optimizer, t_max: int, eta_min: float = 0.0, warmup: int = 0):
        validate.finite("CosineLR: eta_min", eta_min, low=0)
        validate.non_negative_int("CosineLR: warmup", warmup)
        if isinstance(t_max, bool) or not isinstance(t_max, int):
            raise ValueError(f"CosineLR: t_max must be an integer, got {t_max!r}")
        super().__init__(optimizer, step_size=1)
        self.t_max, self.eta_min, self.warmup = max(1, t_max), eta_min, warmup
        if warmup:
            optimizer.lr = self.lr_at(0)

    def lr_at(self, count: int) -> float:
        if count < self.warmup:
            return self.base_lr * (count + 1) / self.warmup
        t = min(count, self.t_max)
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.t_max)) / 2


def clip_grad_norm(model, max_norm: float):
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm
    before clipping as a 0-d array (on the device: no host synchronisation)."""
    validate.finite("clip_grad_norm: max_norm", max_norm, low=0, low_open=True)
    grads = list(model.grads.values())
    if not grads:
        return 0.0
    xp = ops_for(*grads, op="clip_grad_norm").xp
    total = xp.sqrt(sum((g.astype("float64") ** 2).sum() for g in grads))
    scale = xp.minimum(1.0, max_norm / (total + 1e-6)).astype(grads[0].dtype)
    for g in grads:
        g *= scale
    return total
