"""The Ops base class: every op written once against `xp` (numpy or cupy).

Subclasses (NumpyOps, CupyOps) override only the hot ops and keep the base signatures
(tests/backend/test_devices.py checks that). Arrays are (N, features) unless said otherwise; ops that
take `out=` write into it so layers can reuse buffers between steps. The math of the sequence
layers' ops is in sequence_ops.py, as functions of xp; the methods here hand it self.xp.
"""
from __future__ import annotations

import math

import numpy

from gpunet.backend import sequence_ops

ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu", "gelu_tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def label_range_error(bad: int, classes: int) -> ValueError:
    """The one message for a class label outside [0, classes), on every device."""
    return ValueError(f"softmax_cross_entropy: label {bad} is out of range for {classes} classes")


def pooled_size(size, kernel, stride, padding=(0, 0)):
    """Output (height, width) of a convolution or pooling window sliding over size."""
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, kernel, stride, padding))


class Ops:
    name = "base"
    xp = numpy

    # ---------------------------------------------------------------- arrays
    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def empty(self, shape, dtype="float32"):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype="float32"):
        return self.xp.zeros(shape, dtype=dtype)

    # ---------------------------------------------------------------- GEMM with epilogue
    def matmul(self, a, b, out=None):
        return self.xp.matmul(a, b, out=out)

    def linear(self, x, weight, bias=None, activation=None, out=None):
        """activation(x @ weight.T + bias) for x (N, in), weight (out, in)."""
        y = self.xp.matmul(x, weight.T, out=out)
        if bias is not None:
            y += bias
        if activation is not None:
            self.activation(activation, y, out=y)
        return y

    def linear_backward(self, x, weight, dy, grad_weight, grad_bias=None, need_dx=True):
        """Writes dW = dy^T x and db = sum(dy) into the given buffers; returns dx = dy W."""
        self.xp.matmul(dy.T, x, out=grad_weight)
        if grad_bias is not None:
            self.xp.sum(dy, axis=0, out=grad_bias)
        return self.xp.matmul(dy, weight) if need_dx else None

    def linear_act_backward(self, x, weight, z, y, dy, activation, grad_weight, grad_bias=None, need_dx=True):
        """Backward of activation(linear(x)): dz = dy * activation'(z, y), then linear_backward."""
        dz = dy if activation is None else self.activation_backward(activation, z, y, dy)
        return self.linear_backward(x, weight, dz, grad_weight, grad_bias, need_dx)

    # ---------------------------------------------------------------- activations
    def erf(self, x):
        vec = numpy.frompyfunc(math.erf, 1, 1)
        return self.xp.asarray(vec(x).astype(x.dtype))

    def activation(self, name, x, out=None):
        xp = self.xp
        if name == "relu":
            return xp.maximum(x, 0, out=out)
        if name == "sigmoid":
            # exp of a non-positive number only: no overflow warnings for large |x|.
            e = xp.exp(-xp.abs(x))
            y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        elif name == "tanh":
            return xp.tanh(x, out=out)
        elif name == "gelu":
            y = 0.5 * x * (1 + self.erf(x * (1 / math.sqrt(2.0))))
        elif name == "gelu_tanh":
            y = 0.5 * x * (1 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
        else:
            raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")
        y = y.astype(x.dtype, copy=False)
        if out is None:
            return y
        out[...] = y
        return out

    def activation_backward(self, name, x, y, dy):
        """dx from the input x, the output y and the upstream gradient dy."""
        xp = self.xp
        if name == "relu":
            return dy * (x > 0)
        if name == "sigmoid":
            return dy * y * (1 - y)
        if name == "tanh":
            return dy * (1 - y * y)
        if name == "gelu":
            cdf = 0.5 * (1 + self.erf(x * (1 / math.sqrt(2.0))))
            pdf = xp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
            return (dy * (cdf + x * pdf)).astype(x.dtype, copy=False)
        if name == "gelu_tanh":
            inner = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
            t = xp.tanh(inner)
            dinner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dinner)).astype(x.dtype, copy=False)
        raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")

    # ---------------------------------------------------------------- softmax family
    def softmax(self, x, axis=-1):
        xp = self.xp
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        e /= e.sum(axis=axis, keepdims=True)
        return e

    def softmax_backward(self, y, dy, axis=-1):
        return y * (dy - (dy * y).sum(axis=axis, keepdims=True))

    def log_softmax(self, x, axis=-1):
        xp = self.xp
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))

    def softmax_cross_entropy(self, logits, labels):
        """Mean cross-entropy of (N, C) logits against int labels (N,), and its gradient.

        One pass over the logits gives both: grad = (softmax - onehot) / N. A label outside
        [0, C) raises label_range_error's ValueError: here at once, on the GPU where the host
        next reads the loss (check_labels, check_errors).
        """
        xp = self.xp
        n = logits.shape[0]
        labels = self.check_labels(labels, logits.shape[1])
        if n == 0:  # the mean over no rows is NaN, as in torch
            return xp.full((), xp.nan, dtype=logits.dtype), xp.empty_like(logits)
        rows = xp.arange(n)
        grad = logits - logits.max(axis=1, keepdims=True)  # shifted logits, then exp, then the gradient
        picked = grad[rows, labels]
        xp.exp(grad, out=grad)
        total = grad.sum(axis=1, keepdims=True)
        loss = (xp.log(total[:, 0]) - picked).mean()
        grad *= 1.0 / (total * n)
        grad[rows, labels] -= 1.0 / n
        return loss.astype(logits.dtype), grad

    def check_labels(self, labels, classes):
        """Labels safe to index (N, classes) rows with; raises for one outside [0, classes).

        Reads the labels on the host; CupyOps records the error on the device instead.
        """
        if labels.size:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= classes:
                raise label_range_error(low if low < 0 else high, classes)
        return labels

    def check_errors(self):
        """Raise what an earlier op flagged on the device (nothing to do where ops raise at once)."""

    def softmax_cross_entropy_soft(self, logits, targets):
        """Mean cross-entropy against probability (or one-hot) targets of the same shape."""
        n = logits.shape[0]
        logp = self.log_softmax(logits, axis=1)
        loss = -(targets * logp).sum() / n
        grad = (self.xp.exp(logp) * targets.sum(axis=1, keepdims=True) - targets) / n
        return loss.astype(logits.dtype), grad.astype(logits.dtype, copy=False)

    # ---------------------------------------------------------------- normalisation
    def layer_norm(self, x, weight, bias, eps):
        """Normalise over the last axis; returns (y, xhat, rstd) for the backward pass."""
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=-1, keepdims=True)
        rstd = 1.0 / self.xp.sqrt(var + eps)
        xhat = centered * rstd
        y = xhat * weight + bias if weight is not None else xhat
        return y, xhat, rstd

    def layer_norm_backward(self, dy, xhat, rstd, weight):
        """Returns (dx, dweight, dbias) with the parameter gradients summed over all rows."""
        d = xhat.shape[-1]
        axes = tuple(range(dy.ndim - 1))
        dweight = (dy * xhat).sum(axis=axes) if weight is not None else None
        dbias = dy.sum(axis=axes) if weight is not None else None
        g = dy * weight if weight is not None else dy
        dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).sum(axis=-1, keepdims=True) / d)
        return dx, dweight, dbias

    # ---------------------------------------------------------------- convolution
    def im2col(self, x, kernel, stride, padding):
        """(N, C, H, W) -> columns (N*OH*OW, C*kh*kw); rows in (n, oh, ow) order."""
        xp = self.xp
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        oh, ow = pooled_size((h, w), kernel, stride, padding)
        xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        cols = xp.empty((n, oh, ow, c, kh, kw), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                patch = xpad[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw]
                cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
        return cols.reshape(n * oh * ow, c * kh * kw)

    def col2im(self, cols, x_shape, kernel, stride, padding):
        """The adjoint of im2col: scatter-add columns back into an (N, C, H, W) array."""
        xp = self.xp
        n, c, h, w = x_shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        oh, ow = pooled_size((h, w), kernel, stride, padding)
        cols = cols.reshape(n, oh, ow, c, kh, kw)
        xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
        for i in range(kh):
            for j in range(kw):
                xpad[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw] += cols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return xpad[:, :, ph : ph + h, pw : pw + w]

    def conv2d(self, x, weight, bias, stride, padding):
        """NCHW convolution as im2col + one GEMM; returns (y, cols) (cols feed the backward).

        The GEMM runs channel-major, (out, c*kh*kw) x (c*kh*kw, n*oh*ow), so that moving its result
        to NCHW copies runs of oh*ow contiguous values (the bias add rides on that copy).
        """
        n, out_c = x.shape[0], weight.shape[0]
        oh, ow = pooled_size(x.shape[2:], weight.shape[2:], stride, padding)
        cols = self.im2col(x, weight.shape[2:], stride, padding)
        y_t = self.xp.matmul(weight.reshape(out_c, -1), cols.T).reshape(out_c, n, oh * ow)
        out = self.xp.empty((n, out_c, oh * ow), dtype=y_t.dtype)
        if bias is None:
            out[...] = y_t.transpose(1, 0, 2)
        else:
            self.xp.add(y_t.transpose(1, 0, 2), bias.reshape(1, out_c, 1), out=out)
        return out.reshape(n, out_c, oh, ow), cols

    def conv2d_backward(self, dy, cols, x_shape, weight, grad_weight, grad_bias, stride, padding, need_dx=True):
        """Writes dW = dY^T cols and db = sum dY; returns dX = col2im(dY W)."""
        out_c = weight.shape[0]
        if grad_bias is not None:
            self.xp.sum(dy, axis=(0, 2, 3), out=grad_bias)
        dy_t = dy.transpose(1, 0, 2, 3).reshape(out_c, -1)  # channel-major, as in the forward GEMM
        w2 = weight.reshape(out_c, -1)
        self.xp.matmul(dy_t, cols, out=grad_weight.reshape(out_c, -1))
        if not need_dx:
            return None
        dcols = self.xp.matmul(w2.T, dy_t).T  # = dY W, laid out as im2col lays out its columns
        return self.col2im(dcols, x_shape, weight.shape[2:], stride, padding)

    # ---------------------------------------------------------------- pooling (through im2col)
    def max_pool(self, x, kernel, stride):
        """(N, C, H, W) -> (y, argmax within each window); ties go to the first, as in torch."""
        n, c, h, w = x.shape
        cols = self.im2col(x.reshape(n * c, 1, h, w), kernel, stride, (0, 0))
        arg = cols.argmax(axis=1)
        y = cols[self.xp.arange(len(arg)), arg]
        return y.reshape(n, c, *pooled_size((h, w), kernel, stride)), arg

    def max_pool_backward(self, dy, argmax, x_shape, kernel, stride):
        n, c, h, w = x_shape
        cols = self.xp.zeros((argmax.size, kernel[0] * kernel[1]), dtype=dy.dtype)
        cols[self.xp.arange(argmax.size), argmax.reshape(-1)] = dy.reshape(-1)  # any backend's argmax layout
        return self.col2im(cols, (n * c, 1, h, w), kernel, stride, (0, 0)).reshape(x_shape)

    def avg_pool(self, x, kernel, stride):
        n, c, h, w = x.shape
        cols = self.im2col(x.reshape(n * c, 1, h, w), kernel, stride, (0, 0))
        return cols.mean(axis=1).reshape(n, c, *pooled_size((h, w), kernel, stride))

    def avg_pool_backward(self, dy, x_shape, kernel, stride):
        n, c, h, w = x_shape
        area = kernel[0] * kernel[1]
        cols = self.xp.repeat(dy.reshape(-1, 1) * (1.0 / area), area, axis=1).astype(dy.dtype, copy=False)
        return self.col2im(cols, (n * c, 1, h, w), kernel, stride, (0, 0)).reshape(x_shape)

    # ---------------------------------------------------------------- sequence layers (see sequence_ops.py)
    def lstm_cell(self, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
        """One LSTM step, gates in torch.nn.LSTMCell's order i, f, g, o."""
        return sequence_ops.lstm_cell(self.xp, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out)

    def lstm_cell_backward(self, dh, dc, acts, c_prev, tanh_c, dgates_out):
        return sequence_ops.lstm_cell_backward(self.xp, dh, dc, acts, c_prev, tanh_c, dgates_out)

    def gru_cell(self, gi, gh, h_prev, h_out):
        """One GRU step, gates in torch.nn.GRUCell's order r, z, n."""
        return sequence_ops.gru_cell(self.xp, gi, gh, h_prev, h_out)

    def gru_cell_backward(self, dh, acts, gh, h_prev, dgi_out, dgh_out):
        return sequence_ops.gru_cell_backward(self.xp, dh, acts, gh, h_prev, dgi_out, dgh_out)

    def attention_softmax(self, scores, scale, causal):
        """softmax(scale * scores) over the last axis, in place; causal masks future keys."""
        return sequence_ops.attention_softmax(self.xp, scores, scale, causal)

    def attention_softmax_backward(self, probs, dprobs, scale):
        return sequence_ops.attention_softmax_backward(self.xp, probs, dprobs, scale)

    def embedding_backward(self, ids, dy, grad_weight):
        """grad_weight = sum of dy rows per id, in place."""
        return sequence_ops.embedding_backward(self.xp, ids, dy, grad_weight)

    # ---------------------------------------------------------------- dropout
    def dropout(self, x, p, stream, residual=None):
        """(x * mask, mask) with the counter-based mask of stream (seed key, step, layer, draw):
        keep with probability 1 - p, scaled by 1 / (1 - p), as gpunet.random.dropout_keep (no
        host draw: the bits are computed with self.xp); with residual (x's shape), residual +
        x * mask. mask is what dropout_backward needs."""
        from gpunet import random  # (gpunet.random imports nothing of the backend)

        keep = random.dropout_keep(x.size, p, stream, self.xp).reshape(x.shape)
        mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))
        y = x * mask
        return (y if residual is None else residual + y), mask

    def dropout_backward(self, dy, p, stream, mask):
        """dy * the forward's mask (regenerated from stream when mask is None)."""
        return dy * mask if mask is not None else self.dropout(dy, p, stream)[0]

    # ---------------------------------------------------------------- optimizer updates
    def sgd_update(self, param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step):
        """In place, with PyTorch's torch.optim.SGD semantics."""
        g = grad + weight_decay * param if weight_decay else grad
        if momentum:
            if first_step:
                velocity[...] = g
            else:
                velocity *= momentum
                velocity += (1 - dampening) * g
            g = g + momentum * velocity if nesterov else velocity
        param -= lr * g

    def adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step):
        """In place, with torch.optim.Adam (decoupled=False) or AdamW (True) semantics."""
        xp = self.xp
        if weight_decay and decoupled:
            param *= 1 - lr * weight_decay
        g = grad + weight_decay * param if weight_decay and not decoupled else grad
        exp_avg *= beta1
        exp_avg += (1 - beta1) * g
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * (g * g)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = xp.sqrt(exp_avg_sq) / math.sqrt(bias2) + eps
        param -= (lr / bias1) * exp_avg / denom

    def clip_grad_norm(self, grads, max_norm):
        """Scale the arrays in grads (a list: flat gradient buffers) in place so that their joint L2
        norm is at most max_norm, as torch.nn.utils.clip_grad_norm_; returns that norm before
        clipping, a float64 0-d array (summed in float64)."""
        xp = self.xp
        total = xp.sqrt(sum(xp.dot(g64, g64) for g64 in (g.reshape(-1).astype("float64") for g in grads)))
        scale = xp.minimum(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g *= scale.astype(g.dtype)
        return total
