"""GPU backend: CuPy (cuBLAS for plain GEMM) with gpunet's own kernels from kernels/*.cu for
GEMM with a fused epilogue, im2col/col2im, max pooling, fused softmax cross-entropy, the LSTM
cell, the attention softmax, layer normalisation, activations and the optimizer updates.

Each override takes the kernel path only for what the kernel handles (float32, contiguous,
not empty) and otherwise falls back to the base Ops, which is written against cupy as well: an
empty input never reaches a launch (the driver refuses a grid with no blocks) and gets the base
Ops' result, the NumPy one (empty outputs, zero gradients). A product with
a bias or activation runs as the fused kernel or as cuBLAS plus a separate epilogue, whichever
was faster when first timed for its size class (gemm_dispatch.py); GPUNET_GEMM=fused|cublas
forces one.

Errors found on the device (a label out of range in the fused softmax cross-entropy) are kept in
device flags, so a step never waits for the GPU, and raised by check_errors, which gn.losses.item
calls where the host reads the loss.
"""
from __future__ import annotations

import math
import os

import numpy

from gpunet.backend import cuda_kernels
from gpunet.backend.cuda_kernels import blocks_for, launch, source
from gpunet.backend.devices import configure_tf32, cupy_status, gpu_name
from gpunet.backend.gemm_dispatch import GemmDispatch, source_hash
from gpunet.backend.ops import Ops, label_range_error, pooled_size

ACTIVATION_CODES = {None: 0, "relu": 1, "sigmoid": 2, "tanh": 3, "gelu": 4, "gelu_tanh": 5}
ROWS_PER_CHUNK = 64  # rows summed by one block of the bias-gradient reduction
GEMM_TILE = 64  # rows (and columns) of C per block of gemm_bias_act
# (smallest, largest) out-of-range label seen: the kernel folds bad labels in with atomicMin/Max
NO_LABEL_ERROR = numpy.array([numpy.iinfo(numpy.int64).max, numpy.iinfo(numpy.int64).min], dtype=numpy.int64)


class CupyOps(Ops):
    name = "gpu"

    def __init__(self):
        cupy = cupy_status()[0]
        if cupy is None:
            raise RuntimeError(cupy_status()[1])
        self.xp = cupy
        self.gemm_mode = os.environ.get("GPUNET_GEMM", "auto")  # auto: whichever was measured faster
        if self.gemm_mode not in ("auto", "fused", "cublas"):
            raise ValueError(f"GPUNET_GEMM must be auto, fused or cublas, got {self.gemm_mode!r}")
        self._dispatch = None  # made on first use: it asks the device for its name
        self.tf32 = configure_tf32(cupy)  # cuBLAS float32 mode: full float32 unless GPUNET_TF32=1
        self._label_errors = {}  # classes -> device (smallest, largest) bad label, made once per class count
        self._unchecked = set()  # class counts whose flags were handed to a kernel since the last check

    def erf(self, x):
        from cupyx.scipy.special import erf

        return erf(x)

    def activation(self, name, x, out=None):
        if name not in ACTIVATION_CODES or not _float32(x, out) or x.size == 0:
            return super().activation(name, x, out)
        y = out if out is not None else self.xp.empty_like(x)
        launch("gemm", "activation_forward", blocks_for(x.size), (x, y, numpy.int64(x.size), ACTIVATION_CODES[name]))
        return y

    def activation_backward(self, name, x, y, dy):
        x = y if x is None else x  # tanh and sigmoid need only y; relu and gelu always get x
        if name not in ACTIVATION_CODES or not _float32(x, y, dy) or dy.size == 0:
            return super().activation_backward(name, x, y, dy)
        dx = self.xp.empty_like(dy)
        launch("gemm", "activation_backward", blocks_for(dy.size),
               (x, y, dy, dx, numpy.int64(dy.size), ACTIVATION_CODES[name]))
        return dx

    def linear(self, x, weight, bias=None, activation=None, out=None):
        empty = x.shape[0] == 0 or weight.shape[0] == 0  # (no inputs, K = 0, is fine: y = act(bias))
        if (bias is None and activation is None) or not _float32(x, weight, bias, out) or empty:
            return super().linear(x, weight, bias, activation, out)  # cuBLAS
        y = out if out is not None else self.xp.empty((x.shape[0], weight.shape[0]), dtype="float32")
        args = (x, weight, bias, activation, y)
        mode = self.gemm_mode
        if mode == "auto":
            mode = self._gemm_dispatch().choose(
                x.shape[0], weight.shape[0], x.shape[1], activation,
                lambda: {"fused": lambda: self._fused_linear(*args), "cublas": lambda: self._cublas_linear(*args)})
        (self._cublas_linear if mode == "cublas" else self._fused_linear)(*args)
        return y

    def _fused_linear(self, x, weight, bias, activation, y):
        (m, k), n = x.shape, weight.shape[0]
        launch("gemm", "gemm_bias_act", cuda_kernels.grid_2d(-(-n // GEMM_TILE), -(-m // GEMM_TILE)),
               (x, weight, bias if bias is not None else y, y, m, n, k, bias is not None, ACTIVATION_CODES[activation]))

    def _cublas_linear(self, x, weight, bias, activation, y):
        """cuBLAS, then the bias and the activation as passes of their own."""
        Ops.linear(self, x, weight, bias, activation, out=y)

    def _gemm_dispatch(self):
        if self._dispatch is None:
            device = self.xp.cuda.Device()
            self._dispatch = GemmDispatch(f"{gpu_name(device.id)} sm_{device.compute_capability}",
                                          source_hash(source("gemm")), measure=self._time_on_gpu, tf32=self.tf32)
        return self._dispatch

    def _time_on_gpu(self, fn, warmup: int = 2, repeats: int = 5) -> float:
        for _ in range(warmup):
            fn()
        start, end = self.xp.cuda.Event(), self.xp.cuda.Event()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return self.xp.cuda.get_elapsed_time(start, end) / repeats / 1e3

    def linear_act_backward(self, x, weight, z, y, dy, activation, grad_weight, grad_bias=None, need_dx=True):
        if not _float32(x, weight, z, y, dy, grad_weight, grad_bias) or dy.size == 0:
            return super().linear_act_backward(x, weight, z, y, dy, activation, grad_weight, grad_bias, need_dx)
        xp = self.xp
        m, n = dy.shape
        chunks = -(-m // ROWS_PER_CHUNK)
        dz = dy if activation is None else xp.empty_like(dy)
        partial = xp.empty((chunks, n), dtype="float32")
        launch("gemm", "bias_act_backward", cuda_kernels.grid_2d(-(-n // 256), chunks),
               (dy, z, y, dz, partial, m, n, ROWS_PER_CHUNK, ACTIVATION_CODES[activation], activation is not None))
        if grad_bias is not None:
            partial.sum(axis=0, out=grad_bias)
        xp.matmul(dz.T, x, out=grad_weight)
        return xp.matmul(dz, weight) if need_dx else None

    def im2col(self, x, kernel, stride, padding):
        n, c, h, w = x.shape
        oh, ow = pooled_size((h, w), kernel, stride, padding)
        if not _float32(x) or min(x.size, oh * ow) <= 0:
            return super().im2col(x, kernel, stride, padding)
        cols = self.xp.empty((n * oh * ow, c * kernel[0] * kernel[1]), dtype="float32")
        launch("im2col", "im2col", blocks_for(cols.size), (x, cols, n, c, h, w, *kernel, *stride, *padding, oh, ow))
        return cols

    def col2im(self, cols, x_shape, kernel, stride, padding):
        """Reads cols through its strides, whatever its layout: the conv backward hands over dY W
        transposed (column-major), which the kernel reads coalesced, without a copy."""
        if cols.dtype != self.xp.float32 or math.prod(x_shape) == 0:
            return super().col2im(cols, x_shape, kernel, stride, padding)
        oh, ow = pooled_size(x_shape[2:], kernel, stride, padding)
        x = self.xp.empty(x_shape, dtype="float32")
        row_stride, col_stride = (numpy.int64(s // cols.itemsize) for s in cols.strides)
        launch("im2col", "col2im", blocks_for(x.size),
               (cols, x, row_stride, col_stride, *x_shape, *kernel, *stride, *padding, oh, ow))
        return x

    def max_pool(self, x, kernel, stride):
        n, c, h, w = x.shape
        oh, ow = pooled_size((h, w), kernel, stride)
        if not _float32(x) or min(x.size, oh * ow) <= 0:
            return super().max_pool(x, kernel, stride)
        y = self.xp.empty((n, c, oh, ow), dtype="float32")
        argmax = self.xp.empty(y.shape, dtype="int32")
        launch("im2col", "max_pool", blocks_for(y.size), (x, y, argmax, n, c, h, w, *kernel, *stride, 0, 0, oh, ow))
        return y, argmax

    def max_pool_backward(self, dy, argmax, x_shape, kernel, stride):
        dy = self.xp.ascontiguousarray(dy)
        if not _float32(dy) or argmax.dtype != self.xp.int32 or min(dy.size, math.prod(x_shape)) == 0:
            return super().max_pool_backward(dy, argmax, x_shape, kernel, stride)
        oh, ow = pooled_size(x_shape[2:], kernel, stride)
        dx = self.xp.empty(x_shape, dtype="float32")
        launch("im2col", "max_pool_backward", blocks_for(dx.size),
               (dy, argmax, dx, *x_shape, *kernel, *stride, 0, 0, oh, ow))
        return dx

    def softmax_cross_entropy(self, logits, labels):
        if not _float32(logits) or logits.size == 0:
            return super().softmax_cross_entropy(logits, labels)
        xp = self.xp
        n, classes = logits.shape
        labels = xp.ascontiguousarray(labels, dtype=xp.int64)
        grad = xp.empty_like(logits)
        row_loss = xp.empty(n, dtype="float32")
        launch("softmax_xent", "softmax_xent", n,
               (logits, labels, grad, row_loss, self._label_error_flags(classes), classes, 1.0 / n))
        return row_loss.mean(), grad

    def check_labels(self, labels, classes):
        """Folds labels outside [0, classes) into the device flags (no host read: check_errors
        raises later) and returns the labels clipped into range, safe to index with."""
        if labels.size == 0:
            return labels
        xp = self.xp
        flags = self._label_error_flags(classes)
        bad = (labels < 0) | (labels >= classes)
        none_low, none_high = NO_LABEL_ERROR.tolist()
        flags[0] = xp.minimum(flags[0], xp.where(bad, labels, none_low).min())
        flags[1] = xp.maximum(flags[1], xp.where(bad, labels, none_high).max())
        return xp.clip(labels, 0, classes - 1)

    def check_errors(self):
        """Raise the CPU's ValueError for a label out of range flagged since the last check.

        Reads the flags of the class counts used since then (a device-to-host copy, which waits
        for the GPU: the caller is about to read the loss anyway) and resets a flag it raises for.
        """
        while self._unchecked:
            classes = self._unchecked.pop()
            flags = self._label_errors[classes]
            low, high = (int(v) for v in flags.get())
            if low <= high:  # some label was out of range
                flags.set(NO_LABEL_ERROR)
                raise label_range_error(low if low < 0 else high, classes)

    def _label_error_flags(self, classes: int):
        """The device flags for labels of `classes` classes, marked as needing a check."""
        flags = self._label_errors.get(classes)
        if flags is None:
            flags = self._label_errors[classes] = self.xp.asarray(NO_LABEL_ERROR)
        self._unchecked.add(classes)
        return flags

    def lstm_cell(self, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
        arrays = (x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out)
        if c_prev.size == 0:
            return  # every output is empty (the base's reshape cannot take an empty batch)
        if not _float32(*arrays):
            return super().lstm_cell(*arrays)
        batch, hidden = c_prev.shape
        launch("sequence", "lstm_cell", blocks_for(batch * hidden), (*arrays, batch, hidden))

    def lstm_cell_backward(self, dh, dc, acts, c_prev, tanh_c, dgates_out):
        arrays = (dh, dc, acts, c_prev, tanh_c, dgates_out)
        if c_prev.size == 0:
            return  # every output is empty
        if not _float32(*arrays):
            return super().lstm_cell_backward(*arrays)
        batch, hidden = c_prev.shape
        launch("sequence", "lstm_cell_backward", blocks_for(batch * hidden), (*arrays, batch, hidden))

    def attention_softmax(self, scores, scale, causal):
        if not _float32(scores) or scores.size == 0:
            return super().attention_softmax(scores, scale, causal)
        t = scores.shape[-1]
        launch("sequence", "attention_softmax", scores.size // t, (scores, t, float(scale), bool(causal)))
        return scores

    def attention_softmax_backward(self, probs, dprobs, scale):
        if not _float32(probs, dprobs) or dprobs.size == 0:
            return super().attention_softmax_backward(probs, dprobs, scale)
        t = probs.shape[-1]
        launch("sequence", "attention_softmax_backward", probs.size // t, (probs, dprobs, t, float(scale)))
        return dprobs

    def layer_norm(self, x, weight, bias, eps):
        if not _float32(x, weight, bias) or x.size == 0:
            return super().layer_norm(x, weight, bias, eps)
        width = x.shape[-1]
        y, xhat = self.xp.empty_like(x), self.xp.empty_like(x)
        rstd = self.xp.empty(x.shape[:-1] + (1,), dtype="float32")
        affine = weight is not None
        launch("sequence", "layer_norm", x.size // width,
               (x, weight if affine else x, bias if affine else x, y, xhat, rstd, width, float(eps), affine))
        return y, xhat, rstd

    def layer_norm_backward(self, dy, xhat, rstd, weight):
        dy = self.xp.ascontiguousarray(dy)
        if not _float32(dy, xhat, rstd, weight) or dy.size == 0:
            return super().layer_norm_backward(dy, xhat, rstd, weight)
        width = dy.shape[-1]
        dx = self.xp.empty_like(dy)
        affine = weight is not None
        launch("sequence", "layer_norm_backward", dy.size // width,
               (dy, xhat, rstd, weight if affine else dy, dx, width, affine))
        if not affine:
            return dx, None, None
        rows = dy.reshape(-1, width)
        return dx, (rows * xhat.reshape(-1, width)).sum(axis=0), rows.sum(axis=0)

    def sgd_update(self, param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step):
        if not _float32(param, grad, velocity) or param.size == 0:
            return super().sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov,
                                      first_step)
        launch("optim", "sgd_update", blocks_for(param.size),
               (param, grad, velocity if velocity is not None else param, numpy.int64(param.size), float(lr),
                float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(first_step)))

    def adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step):
        if not _float32(param, grad, exp_avg, exp_avg_sq) or param.size == 0:
            return super().adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                                       decoupled, step)
        launch("optim", "adam_update", blocks_for(param.size),
               (param, grad, exp_avg, exp_avg_sq, numpy.int64(param.size), float(lr), float(beta1), float(beta2),
                float(eps), float(weight_decay), bool(decoupled), float(1 - beta1**step),
                math.sqrt(1 - beta2**step)))

    def embedding_backward(self, ids, dy, grad_weight):
        import cupyx

        grad_weight[...] = 0
        if ids.size and grad_weight.size:
            cupyx.scatter_add(grad_weight, ids.reshape(-1), dy.reshape(-1, grad_weight.shape[1]))


def _float32(*arrays) -> bool:
    """The kernels take C-contiguous float32 arrays (None stands for an unused argument)."""
    return all(a is None or (a.dtype == "float32" and a.flags.c_contiguous) for a in arrays)
