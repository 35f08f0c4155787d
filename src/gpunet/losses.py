"""Losses: each returns (loss, grad) with loss the mean as a 0-d array on the inputs' device
(read it with item(loss), so a training step need not wait for the GPU) and grad the gradient of
that mean with respect to the first argument."""
from __future__ import annotations

import math

from gpunet.backend import Array, ops_for

__all__ = ["LOSSES", "METRICS", "Combined", "binary_cross_entropy_with_logits", "item", "metric", "mse", "report_keys", "resolve",
           "softmax_cross_entropy"]


def item(loss: Array | float) -> float:
    """The loss as a Python float, after raising any error its computation flagged on the device.

    On the GPU an out-of-range label cannot raise inside the step without making the host wait
    for the GPU, so the kernel flags it and this read (where the host waits anyway) raises the
    ValueError the CPU raises at once. float(loss) alone would skip that check.
    """
    ops_for(loss, op="item").check_errors()
    return float(loss)


def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Cross-entropy of softmax(logits) over the last axis.

    logits: (B, C) or (B, T, C) floats. labels: int class ids (B,) or (B, T), or float
    probability / one-hot targets of the same shape as logits. Stable for any logit magnitude.
    """
    ops = ops_for(logits, labels, op="softmax_cross_entropy")
    if logits.ndim not in (2, 3) or logits.dtype.kind != "f":
        raise ValueError(f"softmax_cross_entropy: logits must be float (B, C) or (B, T, C), "
                         f"got {logits.dtype} {tuple(logits.shape)}")
    classes = logits.shape[-1]
    flat = logits.reshape(-1, classes)
    if labels.dtype.kind == "f":
        if labels.shape != logits.shape:
            raise ValueError(f"softmax_cross_entropy: probability targets must have the logits' shape "
                             f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
        loss, grad = ops.softmax_cross_entropy_soft(flat, labels.reshape(-1, classes).astype(logits.dtype))
        return loss, grad.reshape(logits.shape)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"softmax_cross_entropy: labels must be integer class ids, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"softmax_cross_entropy: labels of shape {tuple(logits.shape[:-1])} expected for "
                         f"logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    # A label outside [0, classes) raises: on the CPU here, on the GPU at item(loss) (Ops.check_labels).
    loss, grad = ops.softmax_cross_entropy(flat, labels.reshape(-1).astype("int64", copy=False))
    return loss, grad.reshape(logits.shape)


def mse(y: Array, target: Array) -> tuple[Array, Array]:
    """Mean squared error over all elements."""
    ops_for(y, target, op="mse")
    _same_shape("mse", y, target)
    diff = y - target
    return (diff * diff).mean(), diff * (2.0 / diff.size)


def binary_cross_entropy_with_logits(logits: Array, target: Array) -> tuple[Array, Array]:
    """Mean binary cross-entropy of sigmoid(logits) against targets in [0, 1], computed stably."""
    ops = ops_for(logits, target, op="binary_cross_entropy_with_logits")
    _same_shape("binary_cross_entropy_with_logits", logits, target)
    xp = ops.xp
    target = target.astype(logits.dtype, copy=False)
    loss = xp.maximum(logits, 0) - logits * target + xp.log1p(xp.exp(-xp.abs(logits)))
    grad = (ops.activation("sigmoid", logits) - target) * (1.0 / logits.size)
    return loss.mean(), grad


def _same_shape(name, a, b):
    if a.shape != b.shape:
        raise ValueError(f"{name}: input shape {tuple(a.shape)} and target shape {tuple(b.shape)} differ")


LOSSES = {"softmax_cross_entropy": softmax_cross_entropy, "mse": mse,
          "binary_cross_entropy_with_logits": binary_cross_entropy_with_logits}

# The metric each loss implies, declared with the loss (None: the loss alone): evaluate and fit's
# validation report it (fit's records as val_<metric>). "accuracy" is the share of argmax predictions
# equal to integer class ids, so a loss that implies it takes class ids as targets.
METRICS = {"softmax_cross_entropy": "accuracy", "mse": None, "binary_cross_entropy_with_logits": None}


def metric(loss: str) -> str | None:
    """The metric that loss implies (METRICS), or None (also for a name that is no loss: callers refuse those)."""
    return METRICS.get(loss)


class Combined:
    """The loss of a model with several outputs: loss i of output i against targets i, weighted,
    summed: (sum_i w_i loss_i, [w_i grad_i for each output]). What fit and evaluate use for loss=[...]."""

    def __init__(self, names, weights=None, where: str = "fit"):
        names = list(names)
        unknown = [name for name in names if name not in LOSSES]
        if not names or unknown:
            raise ValueError(f"{where}: unknown loss {(unknown or [''])[0]!r} in loss={names}; choose from {', '.join(LOSSES)}")
        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                 and math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"{where}: loss_weights must be {len(names)} finite numbers >= 0, one per loss, got {weights}")
        self.names, self.weights = names, [float(w) for w in weights]

    def parts(self, outputs, targets) -> list:
        """(loss, gradient) of each output, weighted."""
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(self.names):
            got = f"{len(outputs)} outputs" if isinstance(outputs, (list, tuple)) else "one output"
            raise ValueError(f"loss={self.names} is for a model with {len(self.names)} outputs, but the model gave {got}")
        found = []
        for name, weight, y, target in zip(self.names, self.weights, outputs, targets):
            value, grad = LOSSES[name](y, target)
            found.append((value, grad) if weight == 1.0 else (value * weight, grad * weight))
        return found

    def __call__(self, outputs, targets):
        found = self.parts(outputs, targets)
        total = found[0][0]
        for value, _ in found[1:]:
            total = total + value
        return total, [grad for _, grad in found]


def resolve(loss, weights=None, where: str = "fit"):
    """The loss function for `loss`: LOSSES[name], or a Combined for a list of names (several outputs)."""
    if isinstance(loss, (list, tuple)):
        return Combined(loss, weights, where)
    if weights is not None:
        raise ValueError(f"{where}: loss_weights is for a list of losses (a model with several outputs), got loss={loss!r}")
    if loss not in LOSSES:
        raise ValueError(f"{where}: unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[loss]


def report_keys(loss) -> list[str]:
    """The means an evaluation with `loss` reports besides "samples": "loss" and its metric ("accuracy"), or for
    several outputs the weighted total "loss", then "loss_i" (unweighted) and "accuracy_i" per output i."""
    if not isinstance(loss, (list, tuple)):
        implied = metric(loss)
        return ["loss"] + ([implied] if implied else [])
    keys = ["loss"]
    for i, name in enumerate(loss):
        keys += [f"loss_{i}"] + ([f"{metric(name)}_{i}"] if metric(name) else [])
    return keys
