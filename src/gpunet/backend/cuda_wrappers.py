"""One Python function per CUDA kernel of kernels/*.cu: the only code that launches them.

Each wrapper owns its kernel's launch: the grid and the block (from the constants the kernels
are compiled with: THREADS, TILE_M, ... in cuda_kernels.py), the outputs it allocates, and the
kernel's parameter types, declared beside it as its .cu file declares them (a cuda_kernels.Kernel).
Those refuse an array of the wrong dtype or layout and give each scalar the exact type of its
parameter (CuPy would send a Python int or float as 8 bytes).

CupyOps decides when a kernel applies (float32, contiguous, not empty) and falls back to the
base Ops otherwise. A wrapper handed an empty input raises (launch refuses a grid with no
blocks, which CuPy would silently round up to one). Adding a kernel: see "Adding a kernel" in the README.
"""
from __future__ import annotations

import math

import numpy

from gpunet.backend.cuda_kernels import ACTIVATION_CODES, ROWS_PER_CHUNK, TILE_M, TILE_N, Kernel, blocks_for, grid_2d
from gpunet.backend.devices import cupy_status
from gpunet.backend.ops import pooled_size

# softmax_xent's label-error flags: (smallest, largest) out-of-range label seen, which the kernel
# folds bad labels into with atomicMin/Max; these values mean "none".
NO_LABEL_ERROR = numpy.array([numpy.iinfo(numpy.int64).max, numpy.iinfo(numpy.int64).min], dtype=numpy.int64)


def _cupy():
    return cupy_status()[0]


def _ceil(total: int, per: int) -> int:
    return -(-total // per)


# ------------------------------------------------------------------ gemm.cu
GEMM_BIAS_ACT = Kernel("gemm", "gemm_bias_act", "float*, float*, float*, float*, int, int, int, int, int")
BIAS_ACT_BACKWARD = Kernel("gemm", "bias_act_backward", "float*, float*, float*, float*, float*, int, int, int, int")
ACTIVATION_FORWARD = Kernel("gemm", "activation_forward", "float*, float*, long long, int")
ACTIVATION_BACKWARD = Kernel("gemm", "activation_backward", "float*, float*, float*, float*, long long, int")


def gemm_bias_act(x, weight, bias, activation, y) -> None:
    """y (M, N) = activation(x (M, K) . weight (N, K)^T + bias (N)); bias may be None. One block
    per TILE_M x TILE_N tile of y; past MAX_GRID_Y row tiles a block walks the rest."""
    (m, k), n = x.shape, weight.shape[0]
    GEMM_BIAS_ACT(grid_2d(_ceil(n, TILE_N), _ceil(m, TILE_M)), x, weight, y if bias is None else bias, y, m, n, k,
                  bias is not None, ACTIVATION_CODES[activation])


def bias_act_backward(dy, z, y, activation):
    """(dz, partial): dz = dy * activation'(z, y) (dy itself when there is no activation) and
    the bias gradient's column sums per chunk of ROWS_PER_CHUNK rows, (chunks, N), for the host
    to add up. One thread per column; gridDim.y over the chunks, capped (a block walks the rest)."""
    m, n = dy.shape
    chunks = _ceil(m, ROWS_PER_CHUNK)
    dz = dy if activation is None else _cupy().empty_like(dy)
    partial = _cupy().empty((chunks, n), dtype="float32")
    z, y = (dy if a is None else a for a in (z, y))  # (without an activation neither is read)
    BIAS_ACT_BACKWARD(grid_2d(_ceil(n, BIAS_ACT_BACKWARD.block), chunks), dy, z, y, dz, partial, m, n,
                      ACTIVATION_CODES[activation], activation is not None)
    return dz, partial


def activation_forward(x, activation, out=None):
    """activation(x) elementwise, into out (which may be x) or a new array."""
    y = out if out is not None else _cupy().empty_like(x)
    ACTIVATION_FORWARD(blocks_for(x.size), x, y, x.size, ACTIVATION_CODES[activation])
    return y


def activation_backward(x, y, dy, activation):
    """dy * activation'(x, y) elementwise (tanh and sigmoid read only y, relu and gelu only x:
    the other may be None)."""
    x, y = (x if x is not None else y), (y if y is not None else x)
    dx = _cupy().empty_like(dy)
    ACTIVATION_BACKWARD(blocks_for(dy.size), x, y, dy, dx, dy.size, ACTIVATION_CODES[activation])
    return dx


# ------------------------------------------------------------------ im2col.cu
# Each takes the geometry as twelve ints (GEOMETRY_ARGS): n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow.
_GEOMETRY = ", ".join(["int"] * 12)
IM2COL = Kernel("im2col", "im2col", f"float*, float*, {_GEOMETRY}")
COL2IM = Kernel("im2col", "col2im", f"strided float*, float*, long long, long long, {_GEOMETRY}")
MAX_POOL = Kernel("im2col", "max_pool", f"float*, float*, int*, {_GEOMETRY}")
MAX_POOL_BACKWARD = Kernel("im2col", "max_pool_backward", f"float*, int*, float*, {_GEOMETRY}")


def im2col(x, kernel, stride, padding):
    """The (N*OH*OW, C*KH*KW) columns of x (N, C, H, W), as Ops.im2col."""
    n, c, h, w = x.shape
    oh, ow = pooled_size((h, w), kernel, stride, padding)
    cols = _cupy().empty((n * oh * ow, c * kernel[0] * kernel[1]), dtype="float32")
    IM2COL(blocks_for(cols.size), x, cols, n, c, h, w, *kernel, *stride, *padding, oh, ow)
    return cols


def col2im(cols, x_shape, kernel, stride, padding):
    """The sum of the columns back into an (N, C, H, W) array. cols is read through its strides,
    whatever its layout: the conv backward hands over dY W transposed (column-major), which the
    kernel reads coalesced, without a copy."""
    oh, ow = pooled_size(x_shape[2:], kernel, stride, padding)
    want = (x_shape[0] * oh * ow, x_shape[1] * kernel[0] * kernel[1])
    if cols.shape != want:  # read through strides, a wrong shape would run past the buffer
        raise ValueError(f"col2im: columns of shape {cols.shape} for an input of shape {tuple(x_shape)}; "
                         f"expected {want}")
    x = _cupy().empty(x_shape, dtype="float32")
    row_stride, col_stride = (s // cols.itemsize for s in cols.strides)
    COL2IM(blocks_for(x.size), cols, x, row_stride, col_stride, *x_shape, *kernel, *stride, *padding, oh, ow)
    return x


def max_pool(x, kernel, stride):
    """(y, argmax): the window maxima and, as int32 of y's shape, i * kw + j of the first maximum."""
    n, c, h, w = x.shape
    oh, ow = pooled_size((h, w), kernel, stride)
    y = _cupy().empty((n, c, oh, ow), dtype="float32")
    argmax = _cupy().empty(y.shape, dtype="int32")
    MAX_POOL(blocks_for(y.size), x, y, argmax, n, c, h, w, *kernel, *stride, 0, 0, oh, ow)
    return y, argmax


def max_pool_backward(dy, argmax, x_shape, kernel, stride):
    """The input's gradient: each pixel gathers dy where argmax picked it (no atomics)."""
    oh, ow = pooled_size(x_shape[2:], kernel, stride)
    dx = _cupy().empty(x_shape, dtype="float32")
    MAX_POOL_BACKWARD(blocks_for(dx.size), dy, argmax, dx, *x_shape, *kernel, *stride, 0, 0, oh, ow)
    return dx


# ------------------------------------------------------------------ softmax_xent.cu
SOFTMAX_XENT = Kernel("softmax_xent", "softmax_xent", "float*, long long*, float*, float*, long long*, int, float")


def softmax_xent(logits, labels, label_error):
    """(row_loss, grad) of the mean softmax cross-entropy of (N, C) logits and N int64 labels;
    one block per row. A label outside [0, C) gets loss and gradient 0 and is folded into
    label_error (two int64 on the device, NO_LABEL_ERROR when clean) for the host to check later."""
    n, classes = logits.shape
    grad = _cupy().empty_like(logits)
    row_loss = _cupy().empty(n, dtype="float32")
    SOFTMAX_XENT(n, logits, labels, grad, row_loss, label_error, classes, 1.0 / n)
    return row_loss, grad


# ------------------------------------------------------------------ sequence.cu
LSTM_CELL = Kernel("sequence", "lstm_cell", "float*, float*, float*, float*, float*, float*, float*, int, int")
LSTM_CELL_BACKWARD = Kernel("sequence", "lstm_cell_backward",
                            "float*, float*, float*, float*, float*, float*, int, int")
ATTENTION_SOFTMAX = Kernel("sequence", "attention_softmax", "float*, int, float, int")
ATTENTION_SOFTMAX_BACKWARD = Kernel("sequence", "attention_softmax_backward", "float*, float*, int, float")
LAYER_NORM = Kernel("sequence", "layer_norm", "float*, float*, float*, float*, float*, float*, int, float, int")
LAYER_NORM_BACKWARD = Kernel("sequence", "layer_norm_backward", "float*, float*, float*, float*, float*, int, int")


def lstm_cell(x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out) -> None:
    """One LSTM step, as Ops.lstm_cell: one thread per (batch row, hidden unit)."""
    batch, hidden = c_prev.shape
    LSTM_CELL(blocks_for(batch * hidden), x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out, batch, hidden)


def lstm_cell_backward(dh, dc, acts, c_prev, tanh_c, dgates_out) -> None:
    """dgates_out from dh and dc; dc is overwritten with the gradient of c_prev."""
    batch, hidden = c_prev.shape
    LSTM_CELL_BACKWARD(blocks_for(batch * hidden), dh, dc, acts, c_prev, tanh_c, dgates_out, batch, hidden)


def attention_softmax(scores, scale, causal):
    """softmax(scale * scores) over the last axis, in place, keys after the query masked to 0
    when causal; one block per row."""
    t = scores.shape[-1]
    ATTENTION_SOFTMAX(scores.size // t, scores, t, scale, causal)
    return scores


def attention_softmax_backward(probs, dprobs, scale):
    """The scores' gradient, written over dprobs; one block per row."""
    t = probs.shape[-1]
    ATTENTION_SOFTMAX_BACKWARD(probs.size // t, probs, dprobs, t, scale)
    return dprobs


def layer_norm(x, weight, bias, eps):
    """(y, xhat, rstd) over the last axis, as Ops.layer_norm; weight and bias both or neither."""
    width = x.shape[-1]
    y, xhat = _cupy().empty_like(x), _cupy().empty_like(x)
    rstd = _cupy().empty(x.shape[:-1] + (1,), dtype="float32")
    affine = weight is not None
    LAYER_NORM(x.size // width, x, weight if affine else x, bias if affine else x, y, xhat, rstd, width, eps, affine)
    return y, xhat, rstd


def layer_norm_backward(dy, xhat, rstd, weight):
    """The input's gradient (the host reduces the weight and bias gradients)."""
    width = dy.shape[-1]
    dx = _cupy().empty_like(dy)
    affine = weight is not None
    LAYER_NORM_BACKWARD(dy.size // width, dy, xhat, rstd, weight if affine else dy, dx, width, affine)
    return dx


# ------------------------------------------------------------------ random.cu
PHILOX = Kernel("random", "philox4x32_10_blocks", "int*, int*, long long, long long")
DROPOUT = Kernel("random", "dropout",
                 "float*, float*, float*, long long, long long, long long, int, int, int, float, int")


def philox4x32_10(counters, key: int):
    """Philox4x32-10 of (n, 4) uint32 counters under a 64-bit key: (n, 4) uint32 words."""
    counters = _cupy().ascontiguousarray(counters, dtype="uint32")
    out = _cupy().empty_like(counters)
    n = counters.shape[0]
    PHILOX(blocks_for(n), counters.view("int32"), out.view("int32"), n, _signed64(key))
    return out


def dropout(x, threshold: int, scale: float, stream: tuple, residual=None):
    """x * mask (+ residual, of x's shape, when given), the mask generated in the kernel
    (gpunet.random.dropout_keep's bits for stream, (seed key, step, layer, draw)): nothing drawn
    on the host, nothing copied to the device. The backward is the same launch on dy. One thread
    per 4 elements."""
    key, step, layer, draw = stream
    y = _cupy().empty_like(x)
    DROPOUT(blocks_for(-(-x.size // 4)), x, x if residual is None else residual, y, x.size, _signed64(key),
            _signed64(step % 2**32), _signed32(layer % 2**32), _signed32(draw % 2**32), threshold, scale,
            residual is not None)
    return y


def _signed64(value: int) -> int:
    """A 64-bit pattern as the int64 a long long parameter takes (the kernel reads it unsigned)."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def _signed32(value: int) -> int:
    value %= 2**32
    return value - 2**32 if value >= 2**31 else value


# ------------------------------------------------------------------ optim.cu
SGD_UPDATE = Kernel("optim", "sgd_update", "float*, float*, float*, long long, float, float, float, float, int, int")
ADAM_UPDATE = Kernel("optim", "adam_update",
                     "float*, float*, float*, float*, long long, float, float, float, float, float, int, float, float")


def sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step) -> None:
    """One SGD step in place, torch.optim's semantics; velocity may be None when momentum is 0."""
    SGD_UPDATE(blocks_for(param.size), param, grad, velocity if velocity is not None else param, param.size, lr,
               momentum, dampening, weight_decay, nesterov, first_step)


def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step) -> None:
    """One Adam (AdamW when decoupled) step in place; step counts from 1."""
    ADAM_UPDATE(blocks_for(param.size), param, grad, exp_avg, exp_avg_sq, param.size, lr, beta1, beta2, eps,
                weight_decay, decoupled, 1 - beta1**step, math.sqrt(1 - beta2**step))


SUM_SQUARES = Kernel("optim", "sum_squares", "float*, long long, double*")
CLIP_BY_NORM = Kernel("optim", "clip_by_norm", "float*, long long, double*, int, double, double*")
NORM_PARTIALS = 1024  # at most this many blocks sum squares: each block of clip_by_norm adds them all up


def clip_grad_norm(grad, max_norm):
    """grad (a flat float32 gradient buffer) scaled in place to an L2 norm of at most max_norm, in
    two launches and no host read; returns the norm before clipping, a float64 0-d device array."""
    cupy = _cupy()
    blocks = min(blocks_for(grad.size), NORM_PARTIALS)
    partial, norm = cupy.empty(blocks, dtype="float64"), cupy.empty((), dtype="float64")
    SUM_SQUARES(blocks, grad, grad.size, partial)
    CLIP_BY_NORM(blocks_for(grad.size), grad, grad.size, partial, blocks, max_norm, norm)
    return norm


KERNELS = {k.name: k for k in globals().values() if isinstance(k, Kernel)}  # every kernel, by name
