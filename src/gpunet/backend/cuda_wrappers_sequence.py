"""The wrappers of the sequence layers' kernels, kernels/sequence.cu (recurrent cells, layer norm,
attention softmax), attention.cu and embedding.cu, and of batch_norm.cu, as those of cuda_wrappers.py (which lists them
in its KERNELS): each owns its kernel's launch, grid and outputs, its parameter types declared
beside it as the .cu file declares them."""
from __future__ import annotations

import math

from gpunet.backend.cuda_kernels import ceil_div as _ceil, cupy_module as _cupy
from gpunet.backend.cuda_kernels import ROWS_PER_CHUNK, THREADS, Kernel, blocks_for, done_blocks_counter, grid_2d
from gpunet.backend.ops import sixteen_bit_dtype


# ------------------------------------------------------------------ sequence.cu
LSTM_CELL = Kernel("sequence", "lstm_cell", "float*, float*, float*, float*, float*, float*, float*, int, int")
LSTM_CELL_BACKWARD = Kernel("sequence", "lstm_cell_backward",
                            "float*, float*, float*, float*, float*, float*, int, int")
ATTENTION_SOFTMAX = Kernel("sequence", "attention_softmax", "float*, int, float, int")
ATTENTION_SOFTMAX_BACKWARD = Kernel("sequence", "attention_softmax_backward", "float*, float*, int, float")
_LAYER_NORM = "float*, float*, float*, float*, float*, {0}*, float*, float*, int, float, int, int"
LAYER_NORM = Kernel("sequence", "layer_norm", _LAYER_NORM.format("float"))
LAYER_NORM_BF16 = Kernel("sequence", "layer_norm_bf16", _LAYER_NORM.format("__nv_bfloat16"))
LAYER_NORM_F16 = Kernel("sequence", "layer_norm_f16", _LAYER_NORM.format("__half"))
_LAYER_NORMS = {"fp32": LAYER_NORM, "bf16": LAYER_NORM_BF16, "fp16": LAYER_NORM_F16}  # by y's precision
LAYER_NORM_BACKWARD = Kernel("sequence", "layer_norm_backward", "float*, float*, float*, float*, float*, float*, "
                             "float*, float*, float*, unsigned int*, long long, int, int, int")


def lstm_cell(x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out) -> None:
    """One LSTM step, as Ops.lstm_cell: one thread per (batch row, hidden unit)."""
    batch, hidden = c_prev.shape
    LSTM_CELL(blocks_for(batch * hidden), x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out, batch, hidden)


def lstm_cell_backward(dh, dc, acts, c_prev, tanh_c, dgates_out) -> None:
    """dgates_out from dh and dc; dc is overwritten with the gradient of c_prev."""
    batch, hidden = c_prev.shape
    LSTM_CELL_BACKWARD(blocks_for(batch * hidden), dh, dc, acts, c_prev, tanh_c, dgates_out, batch, hidden)


LSTM_STEP = Kernel("sequence", "lstm_step", "float*, float*, float*, float*, float*, float*, float*, float*, int, int")
LSTM_STEP_BACKWARD = Kernel("sequence", "lstm_step_backward",
                            "float*, float*, float*, float*, float*, float*, float*, float*, int, int, int")


def lstm_step(x_gates, w_hh_t, h_prev, c_prev, acts_out, h_out, c_out, tanh_c_out) -> None:
    """One LSTM time step, the recurrent product h_prev W_hh^T fused with the cell, as
    Ops.lstm_step: one thread per (batch row, hidden unit); blocks across the hidden units,
    gridDim.y over the batch rows (capped: a block walks the rest)."""
    batch, hidden = c_prev.shape
    LSTM_STEP(grid_2d(_ceil(hidden, LSTM_STEP.block), batch), x_gates, w_hh_t, h_prev, c_prev, acts_out, h_out,
              c_out, tanh_c_out, batch, hidden)


def lstm_step_backward(dy, dgates_next, w_hh, dc, acts, c_prev, tanh_c, dgates_out) -> None:
    """One backward LSTM time step, dgates_next W_hh fused with the cell backward, as
    Ops.lstm_step_backward (dgates_next None: the last step). Grid as lstm_step."""
    batch, hidden = c_prev.shape
    last = dgates_next is None
    LSTM_STEP_BACKWARD(grid_2d(_ceil(hidden, LSTM_STEP_BACKWARD.block), batch), dy,
                       dgates_out if last else dgates_next, w_hh, dc, acts, c_prev, tanh_c, dgates_out, batch,
                       hidden, last)


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


def layer_norm(x, weight, bias, eps, residual=None, y_kind="fp32"):
    """(y, xhat, rstd, total) over the last axis, as Ops.layer_norm; weight and bias both or
    neither. With residual (x's shape), the rows normalised are total = x + residual, also
    returned (else total is None): a residual add and the next layer norm in one launch.
    y_kind "bf16" or "fp16": y is written in that 16-bit format (rounded to nearest even), the rest
    in float32."""
    width = x.shape[-1]
    y = _cupy().empty(x.shape, dtype="float32" if y_kind == "fp32" else sixteen_bit_dtype(y_kind))
    xhat = _cupy().empty_like(x)
    total = None if residual is None else _cupy().empty_like(x)
    rstd = _cupy().empty(x.shape[:-1] + (1,), dtype="float32")
    affine = weight is not None
    _LAYER_NORMS[y_kind](x.size // width, x, x if total is None else residual, xhat if total is None else total,
                         weight if affine else x, bias if affine else x, y, xhat, rstd, width, eps, affine,
                         total is not None)
    return y, xhat, rstd, total


def layer_norm_backward(dy, xhat, rstd, weight, grad_weight=None, grad_bias=None, residual=None):
    """The input's gradient (+ residual when given), and with weight the parameters' gradients
    written into grad_weight and grad_bias (contiguous, of the width), all in one launch: one
    warp per row, each block sums ROWS_PER_CHUNK rows' columns into a scratch (2, chunks, width)
    and the block that finishes last adds those up in chunk order (kernels/sequence.cu)."""
    width = dy.shape[-1]
    rows = dy.size // width
    chunks = _ceil(rows, ROWS_PER_CHUNK)
    dx = _cupy().empty_like(dy)
    affine = weight is not None
    partial = _cupy().empty((2, chunks, width), dtype="float32") if affine else dx
    LAYER_NORM_BACKWARD(chunks, dy, xhat, rstd, weight if affine else dy, dy if residual is None else residual, dx,
                        partial, grad_weight if affine else dx, grad_bias if affine else dx, done_blocks_counter(),
                        rows, width, affine, residual is not None)
    return dx


# ------------------------------------------------------------------ attention.cu
_FORWARD, _ROWS, _COLUMNS = ("{0}*, float*, float*, long long, int, int, int, float, int",
                             "{0}*, float*, float*, {0}*, float*, long long, int, int, int, float, int",
                             "{0}*, float*, float*, {0}*, float*, long long, int, int, int, int")
ATTENTION_FORWARD = Kernel("attention", "attention_forward", _FORWARD.format("float"))
ATTENTION_BACKWARD_ROWS = Kernel("attention", "attention_backward_rows", _ROWS.format("float"))
ATTENTION_BACKWARD_COLUMNS = Kernel("attention", "attention_backward_columns", _COLUMNS.format("float"))
ATTENTION_FORWARD_BF16 = Kernel("attention", "attention_forward_bf16", _FORWARD.format("__nv_bfloat16"))
ATTENTION_BACKWARD_ROWS_BF16 = Kernel("attention", "attention_backward_rows_bf16", _ROWS.format("__nv_bfloat16"))
ATTENTION_BACKWARD_COLUMNS_BF16 = Kernel("attention", "attention_backward_columns_bf16", _COLUMNS.format("__nv_bfloat16"))
ATTENTION_FORWARD_F16 = Kernel("attention", "attention_forward_f16", _FORWARD.format("__half"))
ATTENTION_BACKWARD_ROWS_F16 = Kernel("attention", "attention_backward_rows_f16", _ROWS.format("__half"))
ATTENTION_BACKWARD_COLUMNS_F16 = Kernel("attention", "attention_backward_columns_f16", _COLUMNS.format("__half"))
_ATTENTION = {  # by qkv's dtype name: (forward, backward rows, backward columns)
    "float32": (ATTENTION_FORWARD, ATTENTION_BACKWARD_ROWS, ATTENTION_BACKWARD_COLUMNS),
    "bfloat16": (ATTENTION_FORWARD_BF16, ATTENTION_BACKWARD_ROWS_BF16, ATTENTION_BACKWARD_COLUMNS_BF16),
    "float16": (ATTENTION_FORWARD_F16, ATTENTION_BACKWARD_ROWS_F16, ATTENTION_BACKWARD_COLUMNS_F16)}
WARPS = THREADS // 32  # the attention kernels give each row of scores one warp


def attention(qkv, causal):
    """(mixed (B, T, H, Dh), probs (B, H, T, T)), both float32, of qkv (B, T, 3, H, Dh), as Ops.attention, in
    one launch: one warp per query row, reading q, k and v where the input projection wrote them. qkv float32,
    or (mixed precision) the 16-bit copy the layer keeps: then the probabilities are rounded to its format before
    they weigh v, as Ops.attention rounds them (kernels/attention.cu)."""
    b, t, _, heads, dh = qkv.shape
    rows = b * heads * t
    probs = _cupy().empty((b, heads, t, t), dtype="float32")
    mixed = _cupy().empty((b, t, heads, dh), dtype="float32")
    _ATTENTION[qkv.dtype.name][0](_ceil(rows, WARPS), qkv, probs, mixed, rows, t, heads, dh, 1.0 / math.sqrt(dh),
                                  causal)
    return mixed, probs


def attention_backward(qkv, probs, dmixed, causal):
    """dqkv (B, T, 3, H, Dh) float32 from dmixed (B, T, H, Dh), as Ops.attention_backward, in two launches:
    the rows of the scores' gradient with dq, then its columns with dk and dv. For a 16-bit qkv, dmixed and
    the probabilities are rounded to its format as operands, and the scores' gradient is kept in it."""
    b, t, _, heads, dh = qkv.shape
    rows = b * heads * t
    _, backward_rows, backward_columns = _ATTENTION[qkv.dtype.name]
    dscores = _cupy().empty(probs.shape, dtype=qkv.dtype)
    dqkv = _cupy().empty(qkv.shape, dtype="float32")
    backward_rows(_ceil(rows, WARPS), qkv, probs, dmixed, dscores, dqkv, rows, t, heads, dh, 1.0 / math.sqrt(dh), causal)
    backward_columns(_ceil(rows, WARPS), qkv, probs, dmixed, dscores, dqkv, rows, t, heads, dh, causal)
    return dqkv


# ------------------------------------------------------------------ embedding.cu
EMBEDDING_FORWARD = Kernel("embedding", "embedding_forward",
                           "long long*, float*, float*, float*, long long*, long long, int, int, long long, int")
EMBEDDING_BACKWARD = Kernel("embedding", "embedding_backward",
                            "long long*, float*, float*, float*, long long, int, int, long long, int")


def embedding_forward(ids, weight, position, id_error):
    """weight[ids] (int64 ids), plus position[t] at position t of (B, T) ids when given (else None);
    a row of NaN for an id out of range, which is also folded into id_error (two int64 on the
    device, NO_RANGE_ERROR's values when clean) for the host to check later."""
    v, d = weight.shape
    y = _cupy().empty(ids.shape + (d,), dtype="float32")
    t = ids.shape[-1] if ids.ndim else 1
    EMBEDDING_FORWARD(blocks_for(y.size), ids, weight, weight if position is None else position, y, id_error, ids.size,
                      t, d, v, position is not None)
    return y


def embedding_backward(ids, dy, grad_weight, grad_position=None) -> None:
    """grad_weight (V, D) = dy's rows summed per id, and grad_position (P, D) (when given; dy is
    then (B, T, D)) = dy summed over its B rows, zero past T: one block per gradient row."""
    v, d = grad_weight.shape
    t = dy.shape[1] if grad_position is not None else 1
    rows = v + (0 if grad_position is None else grad_position.shape[0])
    EMBEDDING_BACKWARD(rows, ids, dy, grad_weight, grad_weight if grad_position is None else grad_position, ids.size,
                       t, d, v, grad_position is not None)


# ------------------------------------------------------------------ batch_norm.cu
BATCH_NORM_FORWARD = Kernel("batch_norm", "batch_norm_forward", "float*, float*, float*, float*, float*, long long*, "
                            "float*, float*, float*, int, int, long long, float, float, float, int, int")
BATCH_NORM_BACKWARD = Kernel("batch_norm", "batch_norm_backward",
                             "float*, float*, float*, float*, float*, float*, float*, int, int, long long, int, int")


def batch_norm(x, weight, bias, running_mean, running_var, batches_tracked, training, momentum, eps):
    """(y, xhat, rstd (1, C, 1...)) of x (N, C, ...), as Ops.batch_norm (the running statistics and the batch
    count updated in place when training), in one launch: one block per channel."""
    n, c = x.shape[:2]
    length = x.size // (n * c)
    y, xhat = _cupy().empty_like(x), _cupy().empty_like(x)
    rstd = _cupy().empty((1, c) + (1,) * (x.ndim - 2), dtype="float32")
    count = n * length
    unbiased = momentum * count / (count - 1) if training else 0.0  # (the layer refuses count < 2 in training)
    affine = weight is not None
    BATCH_NORM_FORWARD(c, x, weight if affine else x, bias if affine else x, running_mean, running_var, batches_tracked,
                       y, xhat, rstd, n, c, length, momentum, unbiased, eps, affine, bool(training))
    return y, xhat, rstd


def batch_norm_backward(dy, xhat, rstd, weight, grad_weight, grad_bias, training):
    """dx of batch_norm, and with weight the parameters' gradients written into grad_weight and grad_bias, as
    Ops.batch_norm_backward, in one launch: one block per channel."""
    n, c = dy.shape[:2]
    dx = _cupy().empty_like(dy)
    affine = weight is not None
    BATCH_NORM_BACKWARD(c, dy, xhat, rstd, weight if affine else dy, grad_weight if affine else dy,
                        grad_bias if affine else dy, dx, n, c, dy.size // (n * c), affine, bool(training))
    return dx
