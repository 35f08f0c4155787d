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

import numpy

from gpunet.backend.cuda_kernels import ceil_div as _ceil, cupy_module as _cupy
from gpunet.backend.cuda_kernels import (ACTIVATION_CODES, ROWS_PER_CHUNK, TILE_M, TILE_N, Kernel, blocks_for,
                                         done_blocks_counter, grid_2d)
from gpunet.backend.ops import adam_scalars, pooled_size, sixteen_bit_dtype

# The range-error flags of softmax_xent's labels and embedding_forward's ids: (smallest, largest)
# out-of-range value seen, which the kernels fold bad values into with atomicMin/Max; these values mean "none".
NO_RANGE_ERROR = numpy.array([numpy.iinfo(numpy.int64).max, numpy.iinfo(numpy.int64).min], dtype=numpy.int64)


# ------------------------------------------------------------------ gemm.cu
GEMM_BIAS_ACT = Kernel("gemm", "gemm_bias_act", "float*, float*, float*, float*, int, int, int, int, int")
BIAS_ACT_BACKWARD = Kernel("gemm", "bias_act_backward",
                           "float*, float*, float*, float*, float*, float*, unsigned int*, int, int, int, int, int")
BIAS_ACT_FORWARD = Kernel("gemm", "bias_act_forward", "float*, float*, float*, long long, int, int, int")
ACTIVATION_FORWARD = Kernel("gemm", "activation_forward", "float*, float*, long long, int")
ACTIVATION_BACKWARD = Kernel("gemm", "activation_backward", "float*, float*, float*, float*, long long, int")


def gemm_bias_act(x, weight, bias, activation, y) -> None:
    """y (M, N) = activation(x (M, K) . weight (N, K)^T + bias (N)); bias may be None. One block
    per TILE_M x TILE_N tile of y; past MAX_GRID_Y row tiles a block walks the rest."""
    (m, k), n = x.shape, weight.shape[0]
    GEMM_BIAS_ACT(grid_2d(_ceil(n, TILE_N), _ceil(m, TILE_M)), x, weight, y if bias is None else bias, y, m, n, k,
                  bias is not None, ACTIVATION_CODES[activation])


def bias_act_backward(dy, z, y, activation, grad_bias=None):
    """dz = dy * activation'(z, y) (dy itself when there is no activation), and with grad_bias the
    bias gradient (the column sums of dz) written into it, all in one launch: one thread per
    column sums ROWS_PER_CHUNK rows into a scratch (chunks, N), and the block that finishes last
    adds those up in chunk order (kernels/gemm.cu). gridDim.y over the chunks, capped (a block
    walks the rest)."""
    m, n = dy.shape
    chunks = _ceil(m, ROWS_PER_CHUNK)
    dz = dy if activation is None else _cupy().empty_like(dy)
    partial = _cupy().empty((chunks, n), dtype="float32")
    z, y = (dy if a is None else a for a in (z, y))  # (without an activation neither is read)
    BIAS_ACT_BACKWARD(grid_2d(_ceil(n, BIAS_ACT_BACKWARD.block), chunks), dy, z, y, dz, partial,
                      partial if grad_bias is None else grad_bias, done_blocks_counter(), m, n,
                      ACTIVATION_CODES[activation], activation is not None, grad_bias is not None)
    return dz


def bias_act_forward(x, bias, activation, out) -> None:
    """out (M, N) = activation(x + bias) elementwise (out may be x): a cuBLAS GEMM's epilogue, one pass."""
    m, n = x.shape
    BIAS_ACT_FORWARD(blocks_for(x.size), x, x if bias is None else bias, out, m, n, bias is not None,
                     ACTIVATION_CODES[activation])


CONV_BIAS_ACT = Kernel("gemm", "conv_bias_act", "float*, float*, float*, int, int, long long, int, int")
CONV_BIAS_ACT_BACKWARD = Kernel("gemm", "conv_bias_act_backward",
                                "float*, float*, float*, float*, int, int, long long, int, int")


def conv_bias_act(y_t, bias, activation):
    """(N, C, L) = activation(y_t (C, N, L) moved to NCHW + bias): the conv GEMM's epilogue, one pass."""
    out_c, n, length = y_t.shape
    out = _cupy().empty((n, out_c, length), dtype="float32")
    CONV_BIAS_ACT(blocks_for(y_t.size), y_t, y_t if bias is None else bias, out, n, out_c, length, bias is not None,
                  ACTIVATION_CODES[activation])
    return out


def conv_bias_act_backward(dy, y, activation, grad_bias):
    """dz_t (C, N * L) = dy * activation'(y), channel-major, and its per-channel sums into grad_bias
    (when given): one block per channel."""
    n, out_c, h, w = dy.shape
    dz_t = _cupy().empty((out_c, n * h * w), dtype="float32")
    y = dy if y is None else y  # (without an activation it is not read)
    CONV_BIAS_ACT_BACKWARD(out_c, dy, y, dz_t, dz_t if grad_bias is None else grad_bias, n, out_c, h * w,
                           ACTIVATION_CODES[activation], grad_bias is not None)
    return dz_t


CONV_RELU_POOL = Kernel("gemm", "conv_relu_pool", "float*, float*, float*, int*, " + ", ".join(["int"] * 9))
CONV_RELU_POOL_BACKWARD = Kernel("gemm", "conv_relu_pool_backward",
                                 "float*, float*, int*, float*, float*, " + ", ".join(["int"] * 9))


def conv_relu_pool(y_t, bias, conv_hw, pool):
    """(pooled, argmax) of max_pool(relu(y_t moved to NCHW + bias)) over non-overlapping pool windows,
    as (N, C, PH, PW) float32 and int32 (each window's first maximum, i * kw + j)."""
    (out_c, n, _), (oh, ow), (kh, kw) = y_t.shape, conv_hw, pool
    ph, pw = oh // kh, ow // kw
    pooled = _cupy().empty((n, out_c, ph, pw), dtype="float32")
    argmax = _cupy().empty((n, out_c, ph, pw), dtype="int32")
    CONV_RELU_POOL(blocks_for(pooled.size), y_t, y_t if bias is None else bias, pooled, argmax, n, out_c, oh, ow,
                   ph, pw, kh, kw, bias is not None)
    return pooled, argmax


def conv_relu_pool_backward(dp, pooled, argmax, conv_hw, pool, grad_bias):
    """dz_t (C, N * OH * OW), channel-major, of conv_relu_pool's backward, and its per-channel sums
    into grad_bias (when given): one block per channel."""
    (n, out_c, ph, pw), (oh, ow), (kh, kw) = dp.shape, conv_hw, pool
    dz_t = _cupy().empty((out_c, n * oh * ow), dtype="float32")
    CONV_RELU_POOL_BACKWARD(out_c, dp, pooled, argmax, dz_t, dz_t if grad_bias is None else grad_bias, n, out_c, oh,
                            ow, ph, pw, kh, kw, grad_bias is not None)
    return dz_t


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
SOFTMAX_XENT = Kernel("softmax_xent", "softmax_xent",
                      "float*, long long*, float*, float*, float*, long long*, unsigned int*, int, float")


def softmax_xent(logits, labels, label_error):
    """(loss, grad): the mean softmax cross-entropy (a 0-d array) of (N, C) logits and N int64
    labels, and its gradient; one block per row, the last block to finish sums the rows' losses
    (one launch). A label outside [0, C) gets loss and gradient 0 and is folded into label_error
    (two int64 on the device, NO_RANGE_ERROR when clean) for the host to check later."""
    n, classes = logits.shape
    grad = _cupy().empty_like(logits)
    row_loss = _cupy().empty(n, dtype="float32")
    loss = _cupy().empty((), dtype="float32")
    SOFTMAX_XENT(n, logits, labels, grad, row_loss, loss, label_error, done_blocks_counter(), classes, 1.0 / n)
    return loss, grad


# ------------------------------------------------------------------ random.cu
PHILOX = Kernel("random", "philox4x32_10_blocks", "int*, int*, long long, long long")
_DROPOUT_PARAMS = "float*, float*, float*, long long, long long, long long, int, int, int, float, int, unsigned int*, int"
DROPOUT = Kernel("random", "dropout", _DROPOUT_PARAMS)
DROPOUT_BF16 = Kernel("random", "dropout_bf16", _DROPOUT_PARAMS + ", __nv_bfloat16*")
DROPOUT_F16 = Kernel("random", "dropout_f16", _DROPOUT_PARAMS + ", __half*")


def philox4x32_10(counters, key: int):
    """Philox4x32-10 of (n, 4) uint32 counters under a 64-bit key: (n, 4) uint32 words."""
    counters = _cupy().ascontiguousarray(counters, dtype="uint32")
    out = _cupy().empty_like(counters)
    n = counters.shape[0]
    PHILOX(blocks_for(n), counters.view("int32"), out.view("int32"), n, _signed64(key))
    return out


def dropout(x, threshold: int, scale: float, stream: tuple, residual=None, step_source=None, copy16=None):
    """x * mask (+ residual, of x's shape, when given), the mask generated in the kernel
    (gpunet.random.dropout_keep's bits for stream, (seed key, step, layer, draw)): nothing drawn
    on the host, nothing copied to the device. The backward is the same launch on dy. One thread
    per 4 elements. step_source: a one-element uint32 device array the kernel reads the step from
    instead of stream's (a CUDA graph's capture: gpunet.random.step_source). copy16 "bf16" or "fp16":
    returns (y, y rounded into that 16-bit dtype), both written in the one pass (dropout_bf16 / _f16)."""
    key, step, layer, draw = stream
    y = _cupy().empty_like(x)
    args = (x, x if residual is None else residual, y, x.size, _signed64(key), _signed64(step % 2**32),
            _signed32(layer % 2**32), _signed32(draw % 2**32), threshold, scale, residual is not None,
            x.view("uint32") if step_source is None else step_source, step_source is not None)  # (unread: x)
    if copy16 is None:
        DROPOUT(blocks_for(-(-x.size // 4)), *args)
        return y
    y16 = _cupy().empty(x.shape, dtype=sixteen_bit_dtype(copy16))
    {"bf16": DROPOUT_BF16, "fp16": DROPOUT_F16}[copy16](blocks_for(-(-x.size // 4)), *args, y16)
    return y, y16


def _signed64(value: int) -> int:
    """A 64-bit pattern as the int64 a long long parameter takes (the kernel reads it unsigned)."""
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def _signed32(value: int) -> int:
    value %= 2**32
    return value - 2**32 if value >= 2**31 else value


# ------------------------------------------------------------------ optim.cu
SGD_UPDATE = Kernel("optim", "sgd_update",
                    "float*, float*, float*, long long, float, float, float, float, int, int, float*, int")
ADAM_UPDATE = Kernel("optim", "adam_update",
                     "float*, float*, float*, float*, long long, float, float, float, float, float, int, float, float, "
                     "float*, int")


SGD_UPDATE_SCALED = Kernel("optim", "sgd_update_scaled",
                           "float*, float*, float*, long long, float, float, float, float, int, int, long long, float*, "
                           "int, float*")
ADAM_UPDATE_SCALED = Kernel("optim", "adam_update_scaled",
                            "float*, float*, float*, float*, long long, float, double, double, float, float, int, "
                            "float*, int, float*")


def sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step,
               scalars=None) -> None:
    """One SGD step in place, torch.optim's semantics; velocity may be None when momentum is 0.
    scalars: a device array holding lr, read by the kernel instead of lr (for a replayed graph); or, in
    a loss-scaled step, a gpunet.optim.LossScaled (its scalars, the scaler's device state, first_at):
    sgd_update_scaled, which writes nothing when the state says a gradient was not finite."""
    state = getattr(scalars, "loss_scale_state", None)
    if state is not None:
        record = scalars.scalars
        SGD_UPDATE_SCALED(blocks_for(param.size), param, grad, velocity if velocity is not None else param,
                          param.size, lr, momentum, dampening, weight_decay, nesterov, first_step, scalars.first_at,
                          param if record is None else record, record is not None, state)
        return
    SGD_UPDATE(blocks_for(param.size), param, grad, velocity if velocity is not None else param, param.size, lr,
               momentum, dampening, weight_decay, nesterov, first_step, param if scalars is None else scalars,
               scalars is not None)


def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step,
                scalars=None) -> None:
    """One Adam (AdamW when decoupled) step in place; step counts from 1. scalars: a device array
    holding adam_scalars(lr, beta1, beta2, step), read by the kernel instead (for a replayed graph); or,
    in a loss-scaled step, a gpunet.optim.LossScaled: adam_update_scaled, which writes nothing when the
    scaler's state says a gradient was not finite and takes the step from its applied count (step unused)."""
    state = getattr(scalars, "loss_scale_state", None)
    if state is not None:
        record = scalars.scalars
        ADAM_UPDATE_SCALED(blocks_for(param.size), param, grad, exp_avg, exp_avg_sq, param.size, lr, beta1, beta2,
                           eps, weight_decay, decoupled, param if record is None else record, record is not None,
                           state)
        return
    _, bias1, bias2_sqrt = adam_scalars(lr, beta1, beta2, step)
    ADAM_UPDATE(blocks_for(param.size), param, grad, exp_avg, exp_avg_sq, param.size, lr, beta1, beta2, eps,
                weight_decay, decoupled, bias1, bias2_sqrt, param if scalars is None else scalars, scalars is not None)


UNSCALE_CHECK = Kernel("optim", "unscale_check", "float*, long long, float*")
LOSS_SCALE_UPDATE = Kernel("optim", "loss_scale_update", "float*, int, double, double, int", block=32)


def unscale_check(grad, state) -> None:
    """grad (a flat float32 gradient buffer) times 1 / the scale in state (a loss scaler's device state,
    gpunet.training.loss_scale), in place, and the state's found word set when a result is inf or NaN."""
    UNSCALE_CHECK(blocks_for(grad.size), grad, grad.size, state)


def loss_scale_update(state, growth_interval: int, growth_factor: float, backoff_factor: float, ring: int) -> None:
    """The scaler's step end in one thread: the scale backed off (and the step counted skipped) or grown,
    as torch.amp.GradScaler.update, the step's flag into the ring and the found word cleared."""
    LOSS_SCALE_UPDATE(1, state, growth_interval, growth_factor, backoff_factor, ring)


SUM_SQUARES = Kernel("optim", "sum_squares", "float*, long long, double*")
CLIP_BY_NORM = Kernel("optim", "clip_by_norm", "float*, long long, double*, int, double, double*")
CLIP_BY_NORM_SCALED = Kernel("optim", "clip_by_norm_scaled", "float*, long long, double*, int, double, double*, float*")
NORM_PARTIALS = 1024  # at most this many blocks sum squares: each block of clip_by_norm adds them all up


def clip_grad_norm(grad, max_norm, loss_scale_state=None):
    """grad (a flat float32 gradient buffer) scaled in place to an L2 norm of at most max_norm, in
    two launches and no host read; returns the norm before clipping, a float64 0-d device array.
    loss_scale_state: a loss scaler's device state (gpunet.training.loss_scale): grad is left as it is
    when that says a gradient was not finite (clip_by_norm_scaled)."""
    cupy = _cupy()
    blocks = min(blocks_for(grad.size), NORM_PARTIALS)
    partial, norm = cupy.empty(blocks, dtype="float64"), cupy.empty((), dtype="float64")
    SUM_SQUARES(blocks, grad, grad.size, partial)
    if loss_scale_state is not None:
        CLIP_BY_NORM_SCALED(blocks_for(grad.size), grad, grad.size, partial, blocks, max_norm, norm, loss_scale_state)
    else:
        CLIP_BY_NORM(blocks_for(grad.size), grad, grad.size, partial, blocks, max_norm, norm)
    return norm



# the sequence layers' kernels (sequence.cu, attention.cu, embedding.cu) have their wrappers in a module of their own,
# as the 16-bit conversions (precision.cu) have
from gpunet.backend import cuda_precision as _precision, cuda_wrappers_sequence as _sequence  # noqa: E402

KERNELS = {k.name: k for k in [*globals().values(), *vars(_sequence).values(), *vars(_precision).values()]
           if isinstance(k, Kernel)}  # every kernel, by name
