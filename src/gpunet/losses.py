"""Losses: each returns (loss, grad) with loss the mean as a 0-d array on the inputs' device
(read it with item(loss), so a training step need not wait for the GPU) and grad the gradient of
that mean with respect to the first argument."""
from __future__ import annotations

from gpunet.backend import Array, ops_for

__all__ = ["LOSSES", "METRICS", "binary_cross_entropy_with_logits", "item", "metric", "mse", "softmax_cross_entropy"]


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
