"""CPU backend: NumPy (OpenBLAS for GEMM) with Numba kernels where NumPy is slow."""
from __future__ import annotations

import math
import threading

import numpy

from gpunet.backend import cpu_kernels, cpu_precision_kernels
from gpunet.backend.cpu_conv_kernels import kernels as conv_kernels
from gpunet.backend.cpu_sequence_kernels import kernels as sequence_kernels
from gpunet.backend.ops import Ops, adam_scalars, pooled_size


class NumpyOps(Ops):
    name = "cpu"
    xp = numpy

    def erf(self, x):
        return cpu_kernels.erf(x)

    def activation(self, name, x, out=None):
        if name == "gelu" and x.dtype == numpy.float32:
            return cpu_kernels.gelu32(x, out)
        return super().activation(name, x, out)

    def activation_backward(self, name, x, y, dy):
        if name == "gelu" and x.dtype == numpy.float32 and dy.dtype == numpy.float32:
            return cpu_kernels.gelu_grad32(x, dy)
        return super().activation_backward(name, x, y, dy)

    def round_16bit(self, x, kind):
        if kind in ("bf16", "fp16") and x.dtype == numpy.float32:  # (one pass; NumPy's casts take two)
            return cpu_precision_kernels.round_16bit(numpy.ascontiguousarray(x), kind)
        return super().round_16bit(x, kind)

    def to_16bit(self, x, kind):
        if kind == "fp16" and x.dtype == numpy.float32:  # (twice NumPy's speed here; ml_dtypes' bfloat16 is fast)
            return cpu_precision_kernels.to_float16(numpy.ascontiguousarray(x))
        return super().to_16bit(x, kind)

    def from_16bit(self, x):
        if x.dtype == numpy.float16:  # (a table: twice NumPy's speed here)
            return cpu_precision_kernels.from_float16(numpy.ascontiguousarray(x))
        return super().from_16bit(x)

    def layer_norm(self, x, weight, bias, eps, for_product=False):
        if not _fusable(x, weight, bias) or x.ndim < 1 or not x.size:
            return super().layer_norm(x, weight, bias, eps, for_product)
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        y, xhat = numpy.empty_like(x), numpy.empty_like(x)
        rstd = numpy.empty((*x.shape[:-1], 1), dtype=x.dtype)
        affine = weight is not None
        sequence_kernels().layer_norm(x2, weight if affine else x2[0], bias if affine else x2[0], affine, float(eps),
                                      y.reshape(-1, d), xhat.reshape(-1, d), rstd.reshape(-1))
        return self.store_16bit(y) if for_product else y, xhat, rstd

    def layer_norm_backward(self, dy, xhat, rstd, weight, grad_weight=None, grad_bias=None, residual=None):
        arrays = (dy, xhat, rstd, weight, grad_weight, grad_bias, residual)
        affine = weight is not None
        if not _fusable(*arrays) or not dy.size or (affine and (grad_weight is None or grad_bias is None)):
            return super().layer_norm_backward(*arrays)
        d = dy.shape[-1]
        dx = numpy.empty_like(dy)
        d2 = dy.reshape(-1, d)
        sequence_kernels().layer_norm_backward(d2, xhat.reshape(-1, d), rstd.reshape(-1), weight if affine else d2[0],
                                               affine, dx.reshape(-1, d), grad_weight if affine else d2[0],
                                               grad_bias if affine else d2[0])
        if residual is not None:
            dx += residual
        return dx, grad_weight, grad_bias

    def batch_norm(self, x, weight, bias, running_mean, running_var, batches_tracked, training, momentum, eps):
        if not _fusable(x, weight, bias, running_mean, running_var) or x.ndim < 2 or not x.size:
            return super().batch_norm(x, weight, bias, running_mean, running_var, batches_tracked, training, momentum,
                                      eps)
        n, c = x.shape[:2]
        x3, affine = x.reshape(n, c, -1), weight is not None
        y, xhat, rstd = numpy.empty_like(x), numpy.empty_like(x), numpy.empty((1, c) + (1,) * (x.ndim - 2), x.dtype)
        mean, var = (numpy.empty(c), numpy.empty(c)) if training else (running_mean.astype("float64"),
                                                                         running_var.astype("float64"))
        sequence_kernels().batch_norm(x3, mean, var, weight if affine else x3[0, 0], bias if affine else x3[0, 0],
                                      affine, training, float(eps), y.reshape(n, c, -1), xhat.reshape(n, c, -1),
                                      rstd.reshape(-1))
        if training:
            self.update_running_statistics(running_mean, running_var, batches_tracked, mean.astype(x.dtype),
                                           var.astype(x.dtype), x.size // c, momentum)
        return y, xhat, rstd

    def batch_norm_backward(self, dy, xhat, rstd, weight, grad_weight, grad_bias, training):
        affine = weight is not None
        if not _fusable(dy, xhat, rstd, weight, grad_weight, grad_bias) or dy.ndim < 2 or not dy.size:
            return super().batch_norm_backward(dy, xhat, rstd, weight, grad_weight, grad_bias, training)
        n, c = dy.shape[:2]
        d3, dx = dy.reshape(n, c, -1), numpy.empty_like(dy)
        unused = d3[0, 0]
        sequence_kernels().batch_norm_backward(d3, xhat.reshape(n, c, -1), rstd.reshape(-1),
                                               weight if affine else unused, affine, training, dx.reshape(n, c, -1),
                                               grad_weight if affine else unused, grad_bias if affine else unused)
        return dx

    def attention_softmax(self, scores, scale, causal):
        if scores.dtype != numpy.float32 or not scores.flags.c_contiguous or scores.shape[-1] != scores.shape[-2] \
                or not scores.size:
            return super().attention_softmax(scores, scale, causal)
        return cpu_kernels.attention_softmax32(scores, scale, causal)

    def attention_softmax_backward(self, probs, dprobs, scale):
        if not _fusable(probs, dprobs) or probs.dtype != numpy.float32 or probs.shape != dprobs.shape:
            return super().attention_softmax_backward(probs, dprobs, scale)
        return cpu_kernels.attention_softmax_backward32(probs, dprobs, scale)

    def softmax_cross_entropy(self, logits, labels):
        if logits.dtype != numpy.float32 or logits.ndim != 2 or not logits.size or not logits.flags.c_contiguous:
            return super().softmax_cross_entropy(logits, labels)
        labels = self.check_labels(labels, logits.shape[1])
        return cpu_kernels.softmax_cross_entropy32(logits, numpy.ascontiguousarray(labels))

    def im2col(self, x, kernel, stride, padding):
        n, c = x.shape[:2]
        oh, ow = pooled_size(x.shape[2:], kernel, stride, padding)
        cols_t = numpy.empty((c * kernel[0] * kernel[1], n * oh * ow), dtype=x.dtype)
        conv_kernels().im2col_t(numpy.ascontiguousarray(x), *kernel, *stride, *padding, oh, ow, cols_t)
        return cols_t.T

    def col2im(self, cols, x_shape, kernel, stride, padding):
        oh, ow = pooled_size(x_shape[2:], kernel, stride, padding)
        out = numpy.empty(x_shape, dtype=cols.dtype)
        conv_kernels().col2im_t(numpy.ascontiguousarray(cols.T), *kernel, *stride, *padding, oh, ow, out)
        return out

    # Stride-1 convolutions run over "wide rows": an output row as wide as the padded input (wp),
    # whose last kw - 1 values are computed and dropped. A column of im2col is then oh * wp
    # consecutive values of a padded plane, one long copy per (channel, tap, image) instead of one
    # per output row (4x faster for LeNet's shapes), and col2im one long add; the GEMMs grow by wp / ow.
    def conv2d(self, x, weight, bias, stride, padding, activation=None):
        if not _wide_rows(x.shape, x.dtype, stride):
            return super().conv2d(x, weight, bias, stride, padding, activation)
        y_wide, cols, ow = self._wide_conv_gemm(x, weight, padding)
        return self.conv_epilogue(y_wide[..., :ow], bias, activation), cols

    def conv2d_backward(self, dy, cols, x_shape, weight, grad_weight, grad_bias, stride, padding, need_dx=True,
                        activation=None, y=None):
        if not _wide_rows(x_shape, dy.dtype, stride):
            return super().conv2d_backward(dy, cols, x_shape, weight, grad_weight, grad_bias, stride, padding, need_dx,
                                           activation, y)
        dz = self._conv_dz(dy, y, activation, grad_bias)
        n, out_c, oh, ow = dz.shape
        dy_wide = _scratch("dy", (out_c, n, oh, x_shape[3] + 2 * padding[1]), dz.dtype)
        dy_wide[..., ow:] = 0  # the dropped values: no gradient flows from them
        dy_wide[..., :ow] = dz.transpose(1, 0, 2, 3)
        return self._wide_gemms_backward(dy_wide.reshape(out_c, -1), cols, x_shape, weight, grad_weight, padding,
                                         need_dx)

    def conv2d_relu_pool(self, x, weight, bias, stride, padding, pool):
        n, out_c = x.shape[0], weight.shape[0]
        if _wide_rows(x.shape, x.dtype, stride):
            y_t, cols, ow = self._wide_conv_gemm(x, weight, padding)
            oh, pitch = y_t.shape[2:]
        else:
            y_t, cols, (oh, ow) = self.conv_gemm(x, weight, stride, padding)
            pitch = ow
        pooled = numpy.empty((n, out_c, oh // pool[0], ow // pool[1]), dtype=y_t.dtype)
        arg = numpy.empty(pooled.shape, dtype=numpy.int32)
        has_bias = bias is not None
        conv_kernels().bias_relu_pool_t(y_t.reshape(out_c, n, oh * pitch), bias if has_bias else pooled.ravel()[:0],
                                        has_bias, *pool, pitch, pooled, arg)
        return pooled, arg, cols, (n, out_c, oh, ow)

    def conv2d_relu_pool_backward(self, dp, pooled, argmax, cols, x_shape, y_shape, weight, grad_weight, grad_bias,
                                  stride, padding, pool, need_dx=True):
        n, out_c, oh, ow = y_shape
        wide = _wide_rows(x_shape, dp.dtype, stride)
        pitch = x_shape[3] + 2 * padding[1] if wide else ow
        dy_t = _scratch("dy", (out_c, n * oh * pitch), dp.dtype)
        has_bias = grad_bias is not None
        conv_kernels().relu_pool_backward_t(numpy.ascontiguousarray(dp), pooled, argmax, *pool, oh, pitch, dy_t,
                                            grad_bias if has_bias else dy_t[:, 0], has_bias)
        if wide:
            return self._wide_gemms_backward(dy_t, cols, x_shape, weight, grad_weight, padding, need_dx)
        return self._conv_gemms_backward(dy_t, cols, x_shape, weight, grad_weight, stride, padding, need_dx)

    def _wide_conv_gemm(self, x, weight, padding):
        """(y (out, N, oh, wp), the columns (c*kh*kw, N*oh*wp) as kept for the backward, ow): the product
        over wide rows, of operands rounded in mixed precision as conv_gemm's."""
        x, weight = self.gemm_operands(x, weight)
        n, c, h, w = x.shape
        out_c, _, kh, kw = weight.shape
        (ph, pw), hp, wp = padding, h + 2 * padding[0], w + 2 * padding[1]
        oh = hp - kh + 1
        planes = _scratch("planes", (n, c, _plane_size(hp, wp, kw)), x.dtype)
        planes[...] = 0
        planes[:, :, : hp * wp].reshape(n, c, hp, wp)[:, :, ph: ph + h, pw: pw + w] = x
        step = planes.itemsize
        runs = numpy.lib.stride_tricks.as_strided(
            planes, (c, kh, kw, n, oh * wp), (planes.strides[1], wp * step, step, planes.strides[0], step),
            writeable=False)
        cols = numpy.empty((c * kh * kw, n * oh * wp), dtype=x.dtype)
        cols.reshape(runs.shape)[...] = runs
        y = numpy.matmul(weight.reshape(out_c, -1), cols, out=_scratch("y", (out_c, n * oh * wp), x.dtype))
        y = y.reshape(out_c, n, oh, wp)  # scratch: the callers' epilogues read it at once
        return y, self.store_16bit(cols), wp - kw + 1

    def _wide_gemms_backward(self, dy_wide, cols, x_shape, weight, grad_weight, padding, need_dx):
        """dW = dY cols^T into grad_weight; dX (or None) from dY (out, N*oh*wp), zero in dropped values."""
        out_c, _, kh, kw = weight.shape
        dy_wide, cols, weight = self.gemm_operands(dy_wide, cols, weight if need_dx else None)
        numpy.matmul(cols, dy_wide.T, out=grad_weight.reshape(out_c, -1).T)  # (K, out): 1.2-1.5x faster in OpenBLAS
        if not need_dx:
            return None
        n, c, h, w = x_shape
        (ph, pw), hp, wp = padding, h + 2 * padding[0], w + 2 * padding[1]
        planes = _scratch("planes", (n, c, _plane_size(hp, wp, kw)), dy_wide.dtype)
        dcols = _scratch("dcols", (c * kh * kw, dy_wide.shape[1]), dy_wide.dtype)
        numpy.matmul(weight.reshape(out_c, -1).T, dy_wide, out=dcols)
        conv_kernels().col2im_rows(dcols, kh, kw, wp, hp - kh + 1, planes)
        return planes[:, :, : hp * wp].reshape(n, c, hp, wp)[:, :, ph: ph + h, pw: pw + w].copy()

    def max_pool(self, x, kernel, stride):
        n, c = x.shape[:2]
        y = numpy.empty((n, c, *pooled_size(x.shape[2:], kernel, stride)), dtype=x.dtype)
        arg = numpy.empty(y.shape, dtype=numpy.int32)
        conv_kernels().max_pool(x, *kernel, *stride, y, arg)
        return y, arg

    def max_pool_backward(self, dy, argmax, x_shape, kernel, stride):
        dx = numpy.empty(x_shape, dtype=dy.dtype)
        conv_kernels().max_pool_backward(numpy.ascontiguousarray(dy), argmax, kernel[1], *stride, dx)
        return dx

    def lstm_cell(self, x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
        arrays = (x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out)
        if not _fusable(*arrays) or x_gates.dtype != numpy.float32:
            return super().lstm_cell(*arrays)
        sequence_kernels().lstm_cell(*arrays)

    def lstm_cell_backward(self, dh, dc, acts, c_prev, tanh_c, dgates_out):
        arrays = (dh, dc, acts, c_prev, tanh_c, dgates_out)
        if not _fusable(*arrays) or dh.dtype != numpy.float32:
            return super().lstm_cell_backward(*arrays)
        sequence_kernels().lstm_cell_backward(*arrays)

    def embedding_backward(self, ids, dy, grad_weight):
        dy2 = dy.reshape(-1, grad_weight.shape[1])
        if not _fusable(dy2, grad_weight):
            return super().embedding_backward(ids, dy, grad_weight)
        sequence_kernels().embedding_backward(ids.reshape(-1), dy2, grad_weight)

    def sgd_update(self, param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step,
                   scalars=None):
        if not _fusable(param, grad, velocity) or scalars is not None:
            return super().sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step,
                                      scalars)
        cpu_kernels.sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step)

    def adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                    scalars=None):
        if not _fusable(param, grad, exp_avg, exp_avg_sq) or scalars is not None:
            return super().adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                                       decoupled, step, scalars)
        _, bias1, bias2_sqrt = adam_scalars(lr, beta1, beta2, step)
        cpu_kernels.adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, bias1,
                                bias2_sqrt)


_SCRATCH = threading.local()
SCRATCH_KEPT_BYTES = 256 << 20  # a larger work array is made fresh each call, not kept for the process's life


def _scratch(name, shape, dtype) -> numpy.ndarray:
    """A work array of this thread, reused from call to call: a fresh array of megabytes costs a
    page fault per 4 KiB (a conv backward's dX GEMM ran 0.4 ms alone, 4.7 ms on new memory).
    Only for arrays that die inside the op that asks: the next call overwrites them."""
    size, store, dtype = math.prod(shape), _SCRATCH.__dict__, numpy.dtype(dtype)
    if size * dtype.itemsize > SCRATCH_KEPT_BYTES:
        return numpy.empty(shape, dtype=dtype)
    array = store.get((name, dtype))
    if array is None or array.size < size:
        array = store[(name, dtype)] = numpy.empty(size, dtype=dtype)
    return array[:size].reshape(shape)


def _wide_rows(x_shape, dtype, stride) -> bool:
    """Whether a convolution runs over wide rows: the forward and the backward decide alike."""
    return tuple(stride) == (1, 1) and min(x_shape) > 0 and dtype in (numpy.float32, numpy.float64)


def _plane_size(hp, wp, kw) -> int:
    """A padded plane and kw - 1 values more: the last run of a plane reads (and col2im writes)
    up to kw - 1 values past it, dropped values that must not land on the next plane."""
    return hp * wp + kw - 1


def _fusable(*arrays) -> bool:
    """The Numba kernels take contiguous float arrays of one dtype (None for an unused slot)."""
    dtypes = {a.dtype for a in arrays if a is not None}
    return (len(dtypes) == 1 and dtypes.pop().kind == "f"
            and all(a.flags.c_contiguous for a in arrays if a is not None))
