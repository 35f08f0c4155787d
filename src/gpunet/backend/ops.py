"""The Ops base class: every op written once against `xp` (numpy or cupy).

Subclasses (NumpyOps, CupyOps) override only the hot ops and keep the base signatures
(tests/backend/test_devices.py checks that). Arrays are (N, features) unless said otherwise; ops that
take `out=` write into it so layers can reuse buffers between steps. The math of the sequence
layers' ops is in sequence_ops.py, as functions of xp; the methods here hand it self.xp. The
convolution and pooling ops are ConvOps's (conv_ops.py), the 16-bit casts and the rounding of every
product's operands in mixed precision SixteenBitOps's (sixteen_bit_ops.py); Ops inherits both.
"""
from __future__ import annotations

import math

import numpy

from gpunet.backend import activations, sequence_ops
from gpunet.backend.conv_ops import ConvOps, pooled_size  # noqa: F401  (pooled_size: imported from here too)
from gpunet.backend.sixteen_bit_ops import SixteenBitOps, is_16bit, sixteen_bit_dtype  # noqa: F401  (as pooled_size)

ACTIVATIONS = activations.NAMES


def id_range_error(bad: int, vocabulary: int) -> ValueError:
    """What the GPU raises for an embedding id out of range (found on the device, read later)."""
    return ValueError(f"Embedding: id {bad} is out of range [0, {vocabulary})")


def label_range_error(bad: int, classes: int) -> ValueError:
    """The one message for a class label outside [0, classes), on every device."""
    return ValueError(f"softmax_cross_entropy: label {bad} is out of range for {classes} classes")


class Ops(ConvOps, SixteenBitOps):
    name = "base"
    xp = numpy

    # ---------------------------------------------------------------- arrays
    def empty(self, shape, dtype="float32"):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype="float32"):
        return self.xp.zeros(shape, dtype=dtype)

    # ---------------------------------------------------------------- GEMM with epilogue
    def matmul(self, a, b, out=None):
        """a @ b of the operands as given: the caller rounds them (gemm_operands), as the recurrent layers do
        once per sequence for W_hh and once per step for h."""
        return self.xp.matmul(a, b, out=out)

    def linear(self, x, weight, bias=None, activation=None, out=None):
        """activation(x @ weight.T + bias) for x (N, in), weight (out, in); the operands rounded to the 16-bit
        format in mixed precision (gemm_operands), as in every GEMM op below."""
        x, weight = self.gemm_operands(x, weight)
        y = self.xp.matmul(x, weight.T, out=out)
        if bias is not None:
            y += bias
        if activation is not None:
            self.activation(activation, y, out=y)
        return y

    def linear_backward(self, x, weight, dy, grad_weight, grad_bias=None, need_dx=True):
        """Writes dW = dy^T x and db = sum(dy) into the given buffers; returns dx = dy W. x may be the
        forward's 16-bit copy (store_16bit); db sums dy itself, in float32, not its rounded copy."""
        dz, x, weight = self.gemm_operands(dy, x, weight if need_dx else None)
        self.xp.matmul(dz.T, x, out=grad_weight)
        if grad_bias is not None:
            self.xp.sum(dy, axis=0, out=grad_bias)
        return self.xp.matmul(dz, weight) if need_dx else None

    def linear_act_backward(self, x, weight, z, y, dy, activation, grad_weight, grad_bias=None, need_dx=True):
        """Backward of activation(linear(x)): dz = dy * activation'(z, y), then linear_backward. z and y may be
        kept in 16 bits (store_16bit: a ReLU's output in mixed precision)."""
        z, y = self.stored_float32(z), self.stored_float32(y)
        dz = dy if activation is None else self.activation_backward(activation, z, y, dy)
        return self.linear_backward(x, weight, dz, grad_weight, grad_bias, need_dx)

    # ---------------------------------------------------------------- activations
    def erf(self, x):
        vec = numpy.frompyfunc(math.erf, 1, 1)
        return self.xp.asarray(vec(x).astype(x.dtype))

    def activation(self, name, x, out=None):
        return activations.lookup(name).forward(self, x, out)

    def activation_backward(self, name, x, y, dy):
        """dx from the input x, the output y and the upstream gradient dy; y may be kept in 16 bits (store_16bit:
        a ReLU's output in mixed precision)."""
        return activations.lookup(name).backward(self, self.stored_float32(x), self.stored_float32(y), dy)

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
    def batch_norm(self, x, weight, bias, running_mean, running_var, batches_tracked, training, momentum, eps):
        """Batch normalisation of x (N, C, ...) over every axis but 1: (y, xhat, rstd), rstd of shape (1, C, 1...).
        training: the batch's statistics, and the running ones (running_var the unbiased variance, as torch's)
        and the batch count updated in place; else the running ones. weight and bias both or neither."""
        xp = self.xp
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        if training:
            mean = x.mean(axis=axes)
            centered = x - mean.reshape(shape)
            var = (centered * centered).mean(axis=axes)
            self.update_running_statistics(running_mean, running_var, batches_tracked, mean, var, x.size // x.shape[1],
                                           momentum)
        else:
            var = running_var
            centered = x - running_mean.reshape(shape)
        rstd = (1.0 / xp.sqrt(var + eps)).reshape(shape).astype(x.dtype)
        xhat = centered * rstd
        y = xhat * weight.reshape(shape) + bias.reshape(shape) if weight is not None else xhat
        return y, xhat, rstd

    @staticmethod
    def update_running_statistics(running_mean, running_var, batches_tracked, mean, var, count, momentum):
        """A training batch's step of batch norm's running statistics, in place: the mean, the unbiased variance
        (as torch's; var is the batch's biased one over count values a channel), the batch count."""
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += (momentum * count / (count - 1)) * var
        batches_tracked += 1

    def batch_norm_backward(self, dy, xhat, rstd, weight, grad_weight, grad_bias, training):
        """dx of batch_norm from dy; with weight, the parameters' gradients written into grad_weight and
        grad_bias. Not training: the normalisation was affine (running statistics are constants)."""
        axes = (0,) + tuple(range(2, dy.ndim))
        if weight is not None:
            grad_weight[...] = (dy * xhat).sum(axis=axes)
            grad_bias[...] = dy.sum(axis=axes)
            g = dy * weight.reshape(rstd.shape)
        else:
            g = dy
        if not training:
            return g * rstd
        return rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))

    def layer_norm(self, x, weight, bias, eps, for_product=False):
        """Normalise over the last axis; returns (y, xhat, rstd) for the backward pass. for_product: only a
        matrix product reads y, so in mixed precision y is its 16-bit copy (store_16bit: the operand the
        product rounds it to; a kernel writes it so directly); in fp32 it changes nothing."""
        mean = x.mean(axis=-1, keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axis=-1, keepdims=True)
        rstd = 1.0 / self.xp.sqrt(var + eps)
        xhat = centered * rstd
        y = xhat * weight + bias if weight is not None else xhat
        return self.store_16bit(y) if for_product else y, xhat, rstd

    def add_layer_norm(self, x, residual, weight, bias, eps, for_product=False):
        """A residual add and the layer norm of its result: (x + residual, *layer_norm(x + residual))."""
        total = x + residual
        return (total, *self.layer_norm(total, weight, bias, eps, for_product))

    def layer_norm_backward(self, dy, xhat, rstd, weight, grad_weight=None, grad_bias=None, residual=None):
        """Returns (dx, dweight, dbias) with the parameter gradients summed over all rows (written
        into grad_weight and grad_bias when given); with residual, dx + residual."""
        d = xhat.shape[-1]
        axes = tuple(range(dy.ndim - 1))
        dweight = dbias = None
        if weight is not None:
            dweight = (dy * xhat).sum(axis=axes, out=grad_weight)
            dbias = dy.sum(axis=axes, out=grad_bias)
        g = dy * weight if weight is not None else dy
        dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).sum(axis=-1, keepdims=True) / d)
        if residual is not None:
            dx += residual
        return dx, dweight, dbias

    # ---------------------------------------------------------------- sequence layers (see sequence_ops.py)
    def lstm_cell(self, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
        """One LSTM step, gates in torch.nn.LSTMCell's order i, f, g, o."""
        return sequence_ops.lstm_cell(self.xp, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out)

    def lstm_cell_backward(self, dh, dc, acts, c_prev, tanh_c, dgates_out):
        return sequence_ops.lstm_cell_backward(self.xp, dh, dc, acts, c_prev, tanh_c, dgates_out)

    def lstm_step(self, x_gates, w_hh_t, h_prev, c_prev, acts_out, h_out, c_out, tanh_c_out):
        """One LSTM time step: the cell of the gates x_gates + h_prev @ w_hh_t (w_hh_t is
        weight_hh transposed, (H, 4H)). A GPU fuses both into one launch. The product's operands
        are taken as given, as matmul's (the layer rounds them)."""
        # (h_gates in acts_out would save an array, but the CPU cell loses its vector loops to aliasing)
        self.lstm_cell(x_gates, self.matmul(h_prev, w_hh_t), c_prev, acts_out, h_out, c_out, tanh_c_out)

    def lstm_step_backward(self, dy, dgates_next, w_hh, dc, acts, c_prev, tanh_c, dgates_out):
        """One backward LSTM time step: dgates_out from dh = dy + dgates_next @ w_hh and dc (the
        gradients of this step's h and c); dc is overwritten with the gradient of c_prev.
        dgates_next None: the last step, which gets no gradient from a later one (dc is not read).
        dgates_next and w_hh are the product's operands as given (the layer rounds them)."""
        if dgates_next is None:
            dh = dy
            dc[...] = 0
        else:
            dh = self.matmul(dgates_next, w_hh)
            dh += dy
        self.lstm_cell_backward(dh, dc, acts, c_prev, tanh_c, dgates_out)

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

    def attention(self, qkv, causal):
        """Self-attention of qkv (B, T, 3, H, Dh): (mixed (B, T, H, Dh), state for attention_backward).
        In mixed precision the state keeps qkv in 16 bits (only the products read it) and the
        probabilities in float32 (the softmax's backward reads them)."""
        return sequence_ops.attention(self.xp, qkv, self.store_16bit(qkv), causal, self.attention_softmax,
                                      self.gemm_operands)

    def attention_backward(self, dmixed, state):
        """dqkv (B, T, 3, H, Dh) from dmixed (B, T, H, Dh) and attention's state."""
        return sequence_ops.attention_backward(self.xp, dmixed, state, self.attention_softmax_backward,
                                               self.gemm_operands)

    def embed(self, ids, weight, position=None):
        """weight[ids]; with position (P, D), ids are (B, T) and position[t] is added at position t."""
        return sequence_ops.embed(ids, weight, position)

    def embed_backward(self, ids, dy, grad_weight, grad_position=None):
        """embed's parameter gradients, written in place (grad_position: zero past dy's T)."""
        self.embedding_backward(ids, dy, grad_weight)
        if grad_position is not None:
            sequence_ops.position_backward(dy, grad_position)

    def embedding_backward(self, ids, dy, grad_weight):
        """grad_weight = sum of dy rows per id, in place."""
        return sequence_ops.embedding_backward(self.xp, ids, dy, grad_weight)

    # ---------------------------------------------------------------- dropout
    def dropout(self, x, p, stream, residual=None):
        """(x * mask, mask) with the counter-based mask of stream (seed key, step, layer, draw):
        keep with probability 1 - p, scaled by 1 / (1 - p), as gpunet.random.dropout_keep (no
        host draw: the bits are computed with self.xp); with residual (x's shape), residual +
        x * mask. The mask returned, what dropout_backward needs, is the kept elements as booleans (a
        byte each, a quarter of the float32 scaled mask: activation memory)."""
        from gpunet import random  # (gpunet.random imports nothing of the backend)

        keep = random.dropout_keep(x.size, p, stream, self.xp).reshape(x.shape)
        y = x * (keep.astype(x.dtype) * (1.0 / (1.0 - p)))
        return (y if residual is None else residual + y), keep

    def dropout_backward(self, dy, p, stream, mask):
        """dy * the forward's scaled mask (regenerated from stream when mask is None)."""
        if mask is None:
            return self.dropout(dy, p, stream)[0]
        return dy * (mask.astype(dy.dtype) * (1.0 / (1.0 - p)))

    # ---------------------------------------------------------------- optimizer updates
    def sgd_update(self, param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step,
                   scalars=None):
        """In place, with PyTorch's torch.optim.SGD semantics. scalars (device-held lr, for a replayed
        CUDA graph) only the GPU's float32 kernel reads."""
        _no_device_scalars(scalars, "sgd_update")
        g = grad + weight_decay * param if weight_decay else grad
        if momentum:
            if first_step:
                velocity[...] = g
            else:
                velocity *= momentum
                velocity += (1 - dampening) * g
            g = g + momentum * velocity if nesterov else velocity
        param -= lr * g

    def adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                    scalars=None):
        """In place, with torch.optim.Adam (decoupled=False) or AdamW (True) semantics. scalars
        (device-held lr and bias corrections, for a replayed CUDA graph) only the GPU's float32 kernel reads."""
        _no_device_scalars(scalars, "adam_update")
        xp = self.xp
        if weight_decay and decoupled:
            param *= 1 - lr * weight_decay
        g = grad + weight_decay * param if weight_decay and not decoupled else grad
        exp_avg *= beta1
        exp_avg += (1 - beta1) * g
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * (g * g)
        _, bias1, bias2_sqrt = adam_scalars(lr, beta1, beta2, step)
        denom = xp.sqrt(exp_avg_sq) / bias2_sqrt + eps
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


def adam_scalars(lr, beta1, beta2, step) -> tuple[float, float, float]:
    """Adam's per-step scalars: lr, 1 - beta1^step and sqrt(1 - beta2^step) (step counts from 1)."""
    return lr, 1 - beta1**step, math.sqrt(1 - beta2**step)


def _no_device_scalars(scalars, op: str) -> None:
    """A graph replays its kernels' arguments as captured: only a kernel that reads its per-step
    scalars from the device can be replayed, so the others refuse them rather than freeze them."""
    if scalars is not None:
        raise TypeError(f"{op}: per-step scalars on the device need the float32 GPU kernel (a CUDA graph step "
                        "needs float32 parameters)")
