"""gpunet's CUDA kernels run on the CPU by the generic kernel emulator (tests/cuda/emulator.py),
against the NumPy reference Ops: index arithmetic, tiling edges, padding, strides, reductions;
then the emulator itself: launch limits, argument checks, warp shuffles, faults, block order.
On a GPU, tests/backend/test_ops.py runs the same kernels for real. tests/kernels/test_races.py
runs this whole file again with every module built under ThreadSanitizer (GPUNET_EMULATOR_TSAN=1).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy
import pytest

from gpunet.backend.cuda_kernels import ACTIVATION_CODES, DEFINE_FLAGS, ROWS_PER_CHUNK, THREADS, TILE_M, TILE_N, source
from gpunet.backend.cuda_wrappers import NO_RANGE_ERROR
from gpunet.backend.ops import Ops, pooled_size
from tests.cuda import emulator as cuda_emulator
from tests.support.arrays import rng
from tests.backend.test_ops import lstm_cell_atols
from tests.support.tolerance import (U, activation_grad_atol, assert_within, bias_act_atol, crossing16,
                                     elementwise_atol, gamma, linear_atol, matmul16_atol, path_atol, round16,
                                     softmax_atol, softmax_backward_atol, sum_atol, ulps, xent_atol,
                                     xent_grad_atol)
from tests.cuda.emulator import KernelFault, LaunchError, build

REFERENCE = Ops()
TSAN = os.environ.get("GPUNET_EMULATOR_TSAN") == "1"
DTYPES = {("int", 4): "int32", ("int", 8): "int64", ("uint", 4): "uint32", ("uint", 8): "uint64",
          ("float", 4): "float32", ("float", 8): "float64", ("bool", 1): "bool"}


def compiled(code: str, name: str, defines=DEFINE_FLAGS):
    """The module built as gpunet builds its kernels: with its -D constants."""
    try:
        return build(code, name=name, tsan=TSAN, defines=defines)
    except RuntimeError as exc:
        if "is not on this machine" in str(exc):
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module", autouse=True)
def load_every_module_first():
    """Under TSan: its symbolizer only knows the modules loaded at its first report."""
    if TSAN:
        for family in ("attention", "batch_norm", "embedding", "gemm", "gemm16", "im2col", "optim", "precision",
                       "random", "sequence", "softmax_xent"):
            compiled(source(family), family)
        probes()


def marshal(module, kernel: str, args) -> list[int | bytes]:
    """NumPy arrays -> their data pointers, None -> null, scalars -> the parameter type's bytes."""
    params = module.kernels[kernel].params
    assert len(args) == len(params), f"{kernel} takes {len(params)} arguments"
    raw = []
    for param, a in zip(params, args):
        if param.kind == "pointer":
            assert a is None or a.flags.c_contiguous, kernel
            raw.append(0 if a is None else a.ctypes.data)
        else:
            raw.append(numpy.array(a, DTYPES[param.kind, param.size]).tobytes())
    return raw


def run(family: str, kernel: str, grid, block, *args) -> None:
    """Launch kernels/<family>.cu's `kernel`: grid and block are ints or tuples."""
    module = compiled(source(family), family)
    module.launch(kernel, grid, block, marshal(module, kernel, args))


@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
@pytest.mark.parametrize("shape", [(1, 1, 1), (70, 33, 130), (TILE_M, 16, TILE_N)], ids=lambda s: "x".join(map(str, s)))
def test_gemm_bias_act(shape, activation):
    m, k, n = shape
    r = rng(m * n)
    x, w, b = (r.standard_normal(s).astype("float32") for s in ((m, k), (n, k), (n,)))
    out = numpy.full((m, n), numpy.nan, "float32")
    grid, code = (-(-n // TILE_N), -(-m // TILE_M)), ACTIVATION_CODES[activation]
    run("gemm", "gemm_bias_act", grid, THREADS, x, w, b, out, m, n, k, 1, code)
    assert_within(out, REFERENCE.linear(x, w, b, activation), linear_atol(x, w, b, activation), "gemm_bias_act")
    out[:] = numpy.nan
    run("gemm", "gemm_bias_act", (grid[0], 1), THREADS, x, w, b, out, m, n, k, 0, code)  # one row of blocks: the y loop
    assert_within(out, REFERENCE.linear(x, w, None, activation), linear_atol(x, w, None, activation), "no bias")


@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
@pytest.mark.parametrize("grid_y", [3, 2])  # one block per row chunk, and fewer (a block walks two)
def test_bias_act_backward(activation, grid_y):
    m, n = 2 * ROWS_PER_CHUNK + 22, THREADS + 44  # three row chunks, two column blocks
    r = rng(5)
    z, dy = r.standard_normal((m, n)).astype("float32"), r.standard_normal((m, n)).astype("float32")
    y = REFERENCE.activation(activation, z) if activation else z
    want = REFERENCE.activation_backward(activation, z, y, dy) if activation else dy
    chunks = -(-m // ROWS_PER_CHUNK)
    dz, partial, done = numpy.zeros_like(dy), numpy.zeros((chunks, n), "float32"), numpy.zeros(1, "uint32")
    for launch in range(2):  # the last block resets the counter: a second launch sums again
        grad_bias = numpy.full(n, numpy.nan, "float32")
        run("gemm", "bias_act_backward", (-(-n // THREADS), grid_y), THREADS, dy, z, y, dz, partial, grad_bias, done,
            m, n, ACTIVATION_CODES[activation], 1, 1)
        dz_atol = activation_grad_atol(dy, activation)
        assert_within(dz, want, dz_atol, "dz")
        assert_within(grad_bias, want.sum(axis=0), sum_atol(want, 0) + dz_atol.sum(axis=0), "grad_bias")
        assert done[0] == 0
    # the sums in chunk order: the same bits whichever block finished last
    numpy.testing.assert_array_equal(grad_bias, sum(partial[c] for c in range(chunks)))


@pytest.mark.parametrize("kernel, kind, kept16", [
    ("bias_act_backward_bf16", "bf16", True), ("bias_act_backward_f16", "fp16", True),
    ("bias_act_backward_dz_bf16", "bf16", False), ("bias_act_backward_dz_f16", "fp16", False)])
@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
def test_bias_act_backward16_is_the_float32_kernel_rounded(kernel, kind, kept16, activation):
    """gemm16.cu's bias_act_backward_bf16 / _f16 (z and y kept in 16 bits) and _dz_bf16 / _dz_f16 (float32):
    dz is gemm.cu's float32 bias_act_backward's on the same values rounded to nearest even into the 16-bit
    format, and the bias gradient its very bits (summed from the float32 values, in the same order)."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kind == "bf16" else numpy.float16)
    m, n = 2 * ROWS_PER_CHUNK + 22, THREADS + 44  # three row chunks, two column blocks
    r = rng(6)
    z, dy = r.standard_normal((m, n)).astype("float32"), r.standard_normal((m, n)).astype("float32")
    y = REFERENCE.activation(activation, z) if activation else z
    kept_z, kept_y = (a.astype(dtype) if kept16 else a for a in (z, y))
    chunks = -(-m // ROWS_PER_CHUNK)
    dz32, dz16 = numpy.zeros_like(dy), numpy.zeros(dy.shape, dtype)
    partial, done = numpy.zeros((chunks, n), "float32"), numpy.zeros(1, "uint32")
    want_bias, grad_bias = numpy.full(n, numpy.nan, "float32"), numpy.full(n, numpy.nan, "float32")
    run("gemm", "bias_act_backward", (-(-n // THREADS), 2), THREADS, dy, *(numpy.asarray(a, "float32") for a in
        (kept_z, kept_y)), dz32, partial, want_bias, done, m, n, ACTIVATION_CODES[activation], 1, 1)
    run("gemm16", kernel, (-(-n // THREADS), 3), THREADS, dy, kept_z, kept_y, dz16, partial, grad_bias, done, m, n,
        ACTIVATION_CODES[activation], 1, 1)
    numpy.testing.assert_array_equal(dz16.view("uint16"), dz32.astype(dtype).view("uint16"))
    numpy.testing.assert_array_equal(grad_bias, want_bias)
    assert done[0] == 0


@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
def test_bias_act_forward(activation):
    m, n = 37, THREADS + 3
    x, b = rng(3).standard_normal((m, n)).astype("float32"), rng(4).standard_normal(n).astype("float32")
    want = REFERENCE.activation(activation, x + b) if activation else x + b
    out = numpy.full_like(x, numpy.nan)
    run("gemm", "bias_act_forward", 5, THREADS, x, b, out, m, n, 1, ACTIVATION_CODES[activation])
    assert_within(out, want, bias_act_atol(0.0, x.astype("float64") + b, activation), "bias_act")
    inplace = x.copy()
    run("gemm", "bias_act_forward", 5, THREADS, inplace, b, inplace, m, n, 0, ACTIVATION_CODES[activation])  # no bias
    assert_within(inplace, REFERENCE.activation(activation, x) if activation else x,
                  bias_act_atol(0.0, x, activation), "activation in place")


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh"])
def test_conv_bias_act_and_backward(activation):
    n, c, length = 3, 5, 37  # the channel-major conv GEMM's output (C, N, L)
    r = rng(6)
    y_t, bias = r.standard_normal((c, n, length)).astype("float32"), r.standard_normal(c).astype("float32")
    out = numpy.full((n, c, length), numpy.nan, "float32")
    run("gemm", "conv_bias_act", 4, THREADS, y_t, bias, out, n, c, length, 1, ACTIVATION_CODES[activation])
    z = y_t.transpose(1, 0, 2) + bias.reshape(1, c, 1)
    want = REFERENCE.activation(activation, z) if activation else z
    assert_within(out, want, bias_act_atol(0.0, y_t.transpose(1, 0, 2).astype("float64") + bias.reshape(1, c, 1),
                                           activation), "conv_bias_act")
    dy = r.standard_normal((n, c, length)).astype("float32")
    dz_t, grad_bias = numpy.full((c, n * length), numpy.nan, "float32"), numpy.full(c, numpy.nan, "float32")
    run("gemm", "conv_bias_act_backward", c, THREADS, dy, out, dz_t, grad_bias, n, c, length,
        ACTIVATION_CODES[activation], 1)
    dz = REFERENCE.activation_backward(activation, z, out, dy) if activation else dy
    dz_atol = activation_grad_atol(dy, activation)
    assert_within(dz_t, dz.transpose(1, 0, 2).reshape(c, -1), dz_atol.transpose(1, 0, 2).reshape(c, -1), "dz")
    assert_within(grad_bias, dz.sum(axis=(0, 2)), sum_atol(dz, (0, 2)) + dz_atol.sum(axis=(0, 2)), "grad_bias")


@pytest.mark.parametrize("kernel, kind, kept16", [
    ("conv_bias_act_backward_bf16", "bf16", True), ("conv_bias_act_backward_f16", "fp16", True),
    ("conv_bias_act_backward_dz_bf16", "bf16", False), ("conv_bias_act_backward_dz_f16", "fp16", False)])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh"])
def test_conv_bias_act_backward16_is_the_float32_kernel_rounded(kernel, kind, kept16, activation):
    """gemm16.cu's conv_bias_act_backward_bf16 / _f16 (y kept in 16 bits) and _dz_bf16 / _dz_f16 (float32): dz_t
    is gemm.cu's float32 kernel's on the same values, rounded to nearest even into the 16-bit format; the bias
    gradient its very bits."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kind == "bf16" else numpy.float16)
    n, c, length = 3, 5, 301  # more elements a channel than THREADS: each thread sums two
    r = rng(7)
    y, dy = r.standard_normal((n, c, length)).astype("float32"), r.standard_normal((n, c, length)).astype("float32")
    if activation == "relu":
        y = numpy.maximum(y, 0)
    kept = y.astype(dtype) if kept16 else y
    dz32, dz16 = numpy.zeros((c, n * length), "float32"), numpy.zeros((c, n * length), dtype)
    want_bias, grad_bias = numpy.full(c, numpy.nan, "float32"), numpy.full(c, numpy.nan, "float32")
    run("gemm", "conv_bias_act_backward", c, THREADS, dy, numpy.asarray(kept, "float32"), dz32, want_bias, n, c,
        length, ACTIVATION_CODES[activation], 1)
    run("gemm16", kernel, c, THREADS, dy, kept, dz16, grad_bias, n, c, length, ACTIVATION_CODES[activation], 1)
    numpy.testing.assert_array_equal(dz16.view("uint16"), dz32.astype(dtype).view("uint16"))
    numpy.testing.assert_array_equal(grad_bias, want_bias)


@pytest.mark.parametrize("kernel, kind", [("activation_backward_bf16", "bf16"), ("activation_backward_f16", "fp16")])
def test_relu_backward_reads_the_16bit_output_it_kept(kernel, kind):
    """gemm16.cu's activation_backward_bf16 / _f16 on a ReLU's 16-bit output: the float32 kernel's dx on its values
    (values too small for the format kept their sign as 0: the same 0 on both)."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kind == "bf16" else numpy.float16)
    y = numpy.maximum(rng(8).standard_normal(1001).astype("float32"), 0) * numpy.float32(1e-6)  # (fp16 flushes some)
    kept, dy = y.astype(dtype), rng(9).standard_normal(1001).astype("float32")
    want, dx = numpy.full_like(dy, numpy.nan), numpy.full_like(dy, numpy.nan)
    wide = kept.astype("float32")
    run("gemm", "activation_backward", 3, 64, wide, wide, dy, want, dy.size, ACTIVATION_CODES["relu"])
    run("gemm16", kernel, 3, 64, kept, kept, dy, dx, dy.size, ACTIVATION_CODES["relu"])
    numpy.testing.assert_array_equal(dx, want)
    assert (dx[y > 0] != 0).any() and (dx[y == 0] == 0).all()


GEOMETRIES = [((2, 3, 9, 11), (3, 3), (1, 1), (1, 1)), ((3, 2, 12, 10), (5, 5), (2, 2), (2, 2)),
              ((1, 2, 7, 6), (2, 3), (3, 2), (0, 1))]


@pytest.mark.parametrize("blocks, threads", [(1, 1), (3, 64)])
@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES)
def test_im2col_and_col2im(shape, kernel, stride, padding, blocks, threads):
    x = rng().standard_normal(shape).astype("float32")
    oh, ow = pooled_size(shape[2:], kernel, stride, padding)
    geometry = (*shape, *kernel, *stride, *padding, oh, ow)
    want = REFERENCE.im2col(x, kernel, stride, padding)
    cols = numpy.full(want.shape, numpy.nan, "float32")
    run("im2col", "im2col", blocks, threads, x, cols, *geometry)
    numpy.testing.assert_array_equal(cols, want)
    dcols = rng(1).standard_normal(want.shape).astype("float32")
    want_dx = REFERENCE.col2im(dcols, shape, kernel, stride, padding)
    rows, width = want.shape
    for layout, strides in ((dcols, (width, 1)), (numpy.ascontiguousarray(dcols.T), (1, rows))):  # row-, column-major
        dx = numpy.full(shape, numpy.nan, "float32")
        run("im2col", "col2im", blocks, threads, layout, dx, *strides, *geometry)
        # each pixel a sum of at most kh kw taps' columns, in any order
        assert_within(dx, want_dx, 2 * gamma(kernel[0] * kernel[1])
                      * REFERENCE.col2im(numpy.abs(dcols), shape, kernel, stride, padding), "col2im")


@pytest.mark.parametrize("kernel_name", ["im2col_bf16", "im2col_f16"])
def test_the_16bit_im2col_gathers_the_same_columns(kernel_name):
    """precision.cu's im2col_bf16 / im2col_f16 (the gather of im2col.cuh on 16-bit elements): the reference
    im2col's columns of the 16-bit values, bit for bit (padding, strides, fewer blocks than columns)."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kernel_name.endswith("bf16") else numpy.float16)
    shape, kernel, stride, padding = (2, 3, 9, 11), (3, 3), (2, 1), (1, 2)
    x = rng(3).standard_normal(shape).astype("float32").astype(dtype)
    oh, ow = pooled_size(shape[2:], kernel, stride, padding)
    want = REFERENCE.im2col(x.astype("float32"), kernel, stride, padding).astype(dtype)
    cols = numpy.full(want.shape, numpy.nan, "float32").astype(dtype)
    run("precision", kernel_name, 3, THREADS, x, cols, *shape, *kernel, *stride, *padding, oh, ow)
    assert numpy.array_equal(cols.view(numpy.uint16), want.view(numpy.uint16))


@pytest.mark.parametrize("shape, kernel, stride", [((2, 3, 8, 8), (2, 2), (2, 2)), ((1, 2, 9, 7), (3, 2), (2, 3))])
def test_max_pool_and_backward(shape, kernel, stride):
    x = rng().standard_normal(shape).astype("float32")
    x[0, 0, 0, :2] = 5.0  # a tie inside one window: the first maximum wins, as in torch
    oh, ow = pooled_size(shape[2:], kernel, stride)
    geometry = (*shape, *kernel, *stride, 0, 0, oh, ow)
    want_y, want_arg = REFERENCE.max_pool(x, kernel, stride)
    y, arg = numpy.zeros((shape[0], shape[1], oh, ow), "float32"), numpy.zeros((shape[0], shape[1], oh, ow), "int32")
    run("im2col", "max_pool", 2, 32, x, y, arg, *geometry)
    numpy.testing.assert_array_equal(y, want_y)
    numpy.testing.assert_array_equal(arg.reshape(-1), want_arg)
    dy = rng(1).standard_normal(y.shape).astype("float32")
    dx = numpy.full(shape, numpy.nan, "float32")
    run("im2col", "max_pool_backward", 2, 32, dy, arg, dx, *geometry)
    numpy.testing.assert_allclose(dx, REFERENCE.max_pool_backward(dy, want_arg, shape, kernel, stride))


@pytest.mark.parametrize("rows, classes", [(3, 2), (4, 300), (2, 5000)])
def test_softmax_xent(rows, classes):
    logits = (rng().standard_normal((rows, classes)) * 8).astype("float32")
    logits[0, 0] = 80.0  # exp would overflow without the running maximum
    labels = rng(1).integers(0, classes, rows).astype("int64")
    grad, row_loss, errors = numpy.zeros_like(logits), numpy.zeros(rows, "float32"), NO_RANGE_ERROR.copy()
    loss, done = numpy.full((), numpy.nan, "float32"), numpy.zeros(1, "uint32")
    run("softmax_xent", "softmax_xent", rows, THREADS, logits, labels, grad, row_loss, loss, errors, done, classes,
        1.0 / rows)
    want_loss, want_grad = REFERENCE.softmax_cross_entropy(logits, labels)
    assert_within(loss, want_loss, xent_atol(logits, labels), "loss")
    assert done[0] == 0  # reset by the last block for the next launch
    assert_within(grad, want_grad, xent_grad_atol(logits, want_grad), "gradient")
    numpy.testing.assert_array_equal(errors, NO_RANGE_ERROR)


def test_lstm_cell_and_backward():
    batch, hidden = 3, 37
    r = rng(2)
    xg, hg = (r.standard_normal((batch, 4 * hidden)).astype("float32") for _ in range(2))
    c_prev = r.standard_normal((batch, hidden)).astype("float32")
    want = [numpy.zeros((batch, 4 * hidden), "float32")] + [numpy.zeros((batch, hidden), "float32") for _ in range(3)]
    REFERENCE.lstm_cell(xg, hg, c_prev, *want)
    got = [numpy.full_like(a, numpy.nan) for a in want]
    run("sequence", "lstm_cell", 2, 64, xg, hg, c_prev, *got, batch, hidden)
    dh = r.standard_normal((batch, hidden)).astype("float32")
    dc = r.standard_normal((batch, hidden)).astype("float32")
    forward_atol, backward_atol = lstm_cell_atols(c_prev, dh, dc)
    for g, w, name in zip(got, want, ("gates", "c", "h", "tanh(c)")):
        assert_within(g, w, forward_atol if g.shape == c_prev.shape else numpy.tile(forward_atol, 4), name)
    acts, _, _, tanh_c = want
    want_dc, want_dgates = dc.copy(), numpy.zeros_like(acts)
    REFERENCE.lstm_cell_backward(dh, want_dc, acts, c_prev, tanh_c, want_dgates)
    got_dc, got_dgates = dc.copy(), numpy.full_like(acts, numpy.nan)
    run("sequence", "lstm_cell_backward", 2, 64, dh, got_dc, acts, c_prev, tanh_c, got_dgates, batch, hidden)
    assert_within(got_dgates, want_dgates, numpy.tile(backward_atol, 4), "dgates")
    assert_within(got_dc, want_dc, backward_atol, "dc")


@pytest.mark.parametrize("block, grid_y", [(32, 2), (THREADS, 3)])  # tiles and rows walked; one tile
def test_lstm_step_and_backward(block, grid_y):
    """The fused LSTM time step against the reference Ops: two steps forward, then back (the last
    step without, the first with the gradient from the later step). H = 37 is no multiple of
    the block: partial hidden tiles and idle threads that still stage and meet the barriers."""
    batch, hidden = 3, 37
    r = rng(3)
    w_hh = (r.standard_normal((4 * hidden, hidden)) * 0.3).astype("float32")
    w_hh_t = numpy.ascontiguousarray(w_hh.T)
    xg = r.standard_normal((2, batch, 4 * hidden)).astype("float32")
    hs, cs = (numpy.zeros((3, batch, hidden), "float32") for _ in range(2))
    hs[0], cs[0] = r.standard_normal((2, batch, hidden)).astype("float32")
    acts, tanh_c = numpy.zeros((2, batch, 4 * hidden), "float32"), numpy.zeros((2, batch, hidden), "float32")
    want = [a.copy() for a in (hs, cs, acts, tanh_c)]
    grid = (-(-hidden // block), grid_y)
    for t in range(2):
        REFERENCE.lstm_step(xg[t], w_hh_t, want[0][t], want[1][t], want[2][t], want[0][t + 1], want[1][t + 1],
                            want[3][t])
        run("sequence", "lstm_step", grid, block, xg[t], w_hh_t, hs[t], cs[t], acts[t], hs[t + 1], cs[t + 1],
            tanh_c[t], batch, hidden)
    # each step: a GEMM of inner length H into the gates (slope <= 1), then the cell; the second step
    # also carries the first's error through |w_hh| (path_atol: the lengths of both steps' sums)
    length = 2 * (hidden + 4)
    for g, w, name in zip((hs, cs, acts, tanh_c), want, ("h", "c", "gates", "tanh(c)")):
        assert_within(g, w, path_atol(w, length), name)
    dys = r.standard_normal((2, batch, hidden)).astype("float32")
    want_dc, want_dgates = numpy.zeros((batch, hidden), "float32"), numpy.zeros_like(acts)
    dc, dgates = numpy.full_like(want_dc, numpy.nan), numpy.full_like(acts, numpy.nan)  # dc unread at the last step
    for t in (1, 0):
        nxt = None if t == 1 else want_dgates[1]
        REFERENCE.lstm_step_backward(dys[t], nxt, w_hh, want_dc, acts[t], cs[t], tanh_c[t], want_dgates[t])
        run("sequence", "lstm_step_backward", grid, block, dys[t], dgates[1], w_hh, dc, acts[t], cs[t], tanh_c[t],
            dgates[t], batch, hidden, int(t == 1))
        assert_within(dgates[t], want_dgates[t], path_atol(want_dgates[t], length), f"dgates[{t}]")
        assert_within(dc, want_dc, path_atol(want_dc, length), f"dc at step {t}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [5, 300])
def test_attention_softmax_and_backward(causal, length):
    shape = (2, 2, length, length) if length < 10 else (1, 1, length, length)  # rows wider than a block
    scores = (rng().standard_normal(shape) * 4).astype("float32")
    blocks = shape[0] * shape[1] * length
    want = REFERENCE.attention_softmax(scores.copy(), 0.125, causal)
    got = scores.copy()
    run("sequence", "attention_softmax", blocks, THREADS, got, length, 0.125, int(causal))
    z = scores.astype("float64") * 0.125
    if causal:
        z = numpy.where(numpy.tril(numpy.ones(shape[-2:], bool)), z, -numpy.inf)
    assert_within(got, want, softmax_atol(z), "attention_softmax")
    dprobs = rng(1).standard_normal(scores.shape).astype("float32")
    want_d = REFERENCE.attention_softmax_backward(want, dprobs.copy(), 0.125)
    got_d = dprobs.copy()
    run("sequence", "attention_softmax_backward", blocks, THREADS, want, got_d, length, 0.125)
    assert_within(got_d, want_d, softmax_backward_atol(want, dprobs, 0.125), "attention_softmax_backward")


def layer_norm_case(module, width: int, affine: bool):
    """(got, want) for y, rstd and dx of layer_norm and its backward; also used on mutated sources."""
    r = rng(4)
    x = (r.standard_normal((5, width)) * 3 + 1).astype("float32")
    w, b = r.standard_normal(width).astype("float32"), r.standard_normal(width).astype("float32")
    want_y, want_xhat, want_rstd = REFERENCE.layer_norm(x, w if affine else None, b if affine else None, 1e-5)
    y, xhat, rstd = numpy.zeros_like(x), numpy.zeros_like(x), numpy.zeros(5, "float32")
    module.launch("layer_norm", 5, THREADS,
                  marshal(module, "layer_norm", (x, x, y, w, b, y, xhat, rstd, width, 1e-5, affine, 0)))
    dy = r.standard_normal(x.shape).astype("float32")
    want_dx = REFERENCE.layer_norm_backward(dy, want_xhat, want_rstd, w if affine else None)[0]
    dx, partial, grads, done = numpy.zeros_like(x), numpy.zeros((2, 1, width), "float32"), numpy.zeros((2, width), "float32"), \
        numpy.zeros(1, "uint32")
    module.launch("layer_norm_backward", 1, THREADS,
                  marshal(module, "layer_norm_backward", (dy, xhat, rstd, w, dy, dx, partial, grads[0], grads[1], done,
                                                          5, width, affine, 0)))
    return (y, rstd, dx), (want_y, want_rstd[:, 0], want_dx)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("width", [7, 600])
def test_layer_norm_and_backward(affine, width):
    got, want = layer_norm_case(compiled(source("sequence"), "sequence"), width, affine)
    length = 4 * width + 5  # as gpunet.parity_bound counts LayerNorm's sums (5 rows)
    for g, w, name in zip(got, want, ("y", "rstd", "dx")):
        assert_within(g, w, path_atol(w, length), name)


@pytest.mark.parametrize("kernel, kind", [("layer_norm_bf16", "bf16"), ("layer_norm_f16", "fp16")])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_writes_y_in_16_bits_for_a_product(kernel, kind, residual):
    """layer_norm_bf16 / layer_norm_f16 (Ops.layer_norm's for_product): y is the float32 normalisation's,
    rounded to nearest even into the 16-bit format (a 16-bit neighbour only where a rounding boundary lies
    within the float32 chain's bound of the reference), and the sum, xhat and rstd are the float32 kernel's."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kind == "bf16" else numpy.float16)
    rows, width = 5, 300
    r = rng(14)
    x = (r.standard_normal((rows, width)) * 3 + 1).astype("float32")
    res = r.standard_normal((rows, width)).astype("float32")
    w, b = r.standard_normal(width).astype("float32"), r.standard_normal(width).astype("float32")
    total = x + res if residual else x
    want_y, want_xhat, want_rstd = REFERENCE.layer_norm(total.astype("float64"), w, b, 1e-5)
    y, xhat, rstd = numpy.zeros(x.shape, dtype), numpy.zeros_like(x), numpy.zeros(rows, "float32")
    summed = numpy.zeros_like(x)
    run("sequence", kernel, rows, THREADS, x, res, summed if residual else xhat, w, b, y, xhat, rstd, width, 1e-5, 1,
        int(residual))
    length = 4 * width + 5
    if residual:
        numpy.testing.assert_array_equal(summed, total)  # one float32 add, as the reference's
    assert_within(xhat, want_xhat, path_atol(want_xhat, length), "xhat")
    assert_within(rstd, want_rstd[:, 0], path_atol(want_rstd, length), "rstd")
    assert_within(y.astype("float32"), round16(want_y, kind), crossing16(want_y, path_atol(want_y, length), kind), "y")


@pytest.mark.parametrize("width", [37, 300])
def test_layer_norm_with_residuals_and_parameter_gradients(width):
    """Three row chunks (the last one short) summed by the last block, and both residual adds."""
    rows = 2 * ROWS_PER_CHUNK + 5
    r = rng(width)
    x, res, dy, dres = ((r.standard_normal((rows, width)) * 2 + 1).astype("float32") for _ in range(4))
    w, b = r.standard_normal(width).astype("float32"), r.standard_normal(width).astype("float32")
    want_total, want_y, want_xhat, want_rstd = REFERENCE.add_layer_norm(x, res, w, b, 1e-5)
    total, y, xhat, rstd = (numpy.full_like(a, numpy.nan) for a in (x, x, x, want_rstd))
    run("sequence", "layer_norm", rows, THREADS, x, res, total, w, b, y, xhat, rstd, width, 1e-5, 1, 1)
    assert_within(total, want_total, ulps(want_total, 1), "x + residual")  # one rounding on each side: the same bits
    length = 4 * width + rows  # as gpunet.parity_bound counts LayerNorm's sums
    assert_within(y, want_y, path_atol(want_y, length), "y")
    assert_within(xhat, want_xhat, path_atol(want_xhat, length), "xhat")
    want_dx, want_dw, want_db = REFERENCE.layer_norm_backward(dy, want_xhat, want_rstd, w, residual=dres)
    chunks = -(-rows // ROWS_PER_CHUNK)
    dx, partial, done = numpy.full_like(x, numpy.nan), numpy.zeros((2, chunks, width), "float32"), numpy.zeros(1, "uint32")
    for launch in range(2):  # the last block resets the counter: a second launch sums again
        dw, db = numpy.full(width, numpy.nan, "float32"), numpy.full(width, numpy.nan, "float32")
        run("sequence", "layer_norm_backward", chunks, THREADS, dy, xhat, rstd, w, dres, dx, partial, dw, db, done,
            rows, width, 1, 1)
        for got, want, name in ((dx, want_dx, "dx"), (dw, want_dw, "dw"), (db, want_db, "db")):
            assert_within(got, want, path_atol(want, length), name)
        assert done[0] == 0
    # the chunks summed in order: the same bits whichever block finished last
    numpy.testing.assert_array_equal(db, sum(partial[1, c] for c in range(chunks)))


def attention_case(b, t, heads, dh, causal, seed=0):
    """qkv (B, T, 3, H, Dh), dmixed (B, T, H, Dh) and Ops.attention's results for them."""
    r = rng(seed)
    qkv = (r.standard_normal((b, t, 3, heads, dh)) * 2).astype("float32")
    dmixed = r.standard_normal((b, t, heads, dh)).astype("float32")
    mixed, state = REFERENCE.attention(qkv, causal)
    return qkv, dmixed, mixed, state[1], REFERENCE.attention_backward(dmixed, state)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, t, heads, dh", [(2, 5, 2, 3), (1, 70, 1, 2), (1, 3, 1, 40)],
                         ids=["small", "rows-over-a-warp", "head-over-a-warp"])
def test_attention_forward_and_backward(b, t, heads, dh, causal):
    qkv, dmixed, want_mixed, want_probs, want_dqkv = attention_case(b, t, heads, dh, causal)
    rows, scale = b * heads * t, 1.0 / numpy.sqrt(dh)
    blocks = -(-rows // (THREADS // 32))  # a warp per row: the last block's last warps have none
    probs, mixed = numpy.full(want_probs.shape, numpy.nan, "float32"), numpy.full(dmixed.shape, numpy.nan, "float32")
    run("attention", "attention_forward", blocks, THREADS, qkv, probs, mixed, rows, t, heads, dh, scale, int(causal))
    # the sums along the way: scores over Dh, the softmax's over T, the mix over T; back: Dh, T, T, T
    length = 2 * dh + 5 * t
    assert_within(probs, want_probs, path_atol(want_probs, length), "probs")
    assert_within(mixed, want_mixed, path_atol(want_mixed, length), "mixed")
    dscores, dqkv = numpy.full_like(probs, numpy.nan), numpy.full_like(qkv, numpy.nan)
    run("attention", "attention_backward_rows", blocks, THREADS, qkv, probs, dmixed, dscores, dqkv, rows, t, heads, dh,
        scale, int(causal))
    run("attention", "attention_backward_columns", blocks, THREADS, qkv, probs, dmixed, dscores, dqkv, rows, t, heads,
        dh, int(causal))
    assert_within(dqkv, want_dqkv, path_atol(want_dqkv, length), "dqkv")


ATTENTION16 = {"bf16": ("attention_forward_bf16", "attention_backward_rows_bf16", "attention_backward_columns_bf16"),
               "fp16": ("attention_forward_f16", "attention_backward_rows_f16", "attention_backward_columns_f16")}


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, t, heads, dh", [(2, 5, 2, 3), (1, 37, 2, 33)], ids=["small", "over-a-warp"])
def test_attention16_rounds_where_ops_attention_rounds(b, t, heads, dh, causal, kind):
    """attention_forward_bf16 / _f16 and their backward kernels: each product's operands are the 16-bit values
    Ops.attention rounds to in mixed precision (q, k and v as kept; the kernel's own probabilities before they
    weigh v; dmixed; the scores' gradient, which the rows kernel writes in 16 bits), multiplied exactly and summed
    in float32. So each output is within one side's float32 sums (matmul16_atol, sides=1) of the float64 product
    of the operands the kernel rounded, and each rounded intermediate is the float64 reference's, rounded, unless
    a 16-bit boundary lies within the float32 chain's bound of it (crossing16)."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kind == "bf16" else numpy.float16)
    forward, backward_rows, backward_columns = ATTENTION16[kind]
    qkv32, dmixed, *_ = attention_case(b, t, heads, dh, causal)
    qkv = qkv32.astype(dtype)
    q, k, v = qkv.astype("float64").transpose(2, 0, 3, 1, 4)  # (B, H, T, Dh) each, exact
    rows, scale, length = b * heads * t, 1.0 / numpy.sqrt(dh), 2 * dh + 5 * t
    blocks = -(-rows // (THREADS // 32))
    mask = numpy.triu(numpy.full((t, t), -numpy.inf), 1) if causal else 0.0
    z = scale * (q @ k.swapaxes(-1, -2)) + mask
    want_probs = numpy.exp(z - z.max(-1, keepdims=True))
    want_probs /= want_probs.sum(-1, keepdims=True)
    probs, mixed = numpy.full(want_probs.shape, numpy.nan, "float32"), numpy.full(dmixed.shape, numpy.nan, "float32")
    run("attention", forward, blocks, THREADS, qkv, probs, mixed, rows, t, heads, dh, scale,
        int(causal))
    assert_within(probs, want_probs, path_atol(want_probs, length), "probs")
    assert_within(mixed.transpose(0, 2, 1, 3), round16(probs, kind) @ v, matmul16_atol(probs, v, kind, sides=1),
                  "mixed")
    dscores, dqkv = numpy.full(probs.shape, numpy.nan, dtype), numpy.full(qkv.shape, numpy.nan, "float32")
    run("attention", backward_rows, blocks, THREADS, qkv, probs, dmixed, dscores, dqkv, rows, t,
        heads, dh, scale, int(causal))
    run("attention", backward_columns, blocks, THREADS, qkv, probs, dmixed, dscores, dqkv, rows,
        t, heads, dh, int(causal))
    d_out = round16(dmixed, kind).transpose(0, 2, 1, 3)  # (B, H, T, Dh)
    p = probs.astype("float64")
    dp = d_out @ v.swapaxes(-1, -2)
    want_ds = scale * p * (dp - (dp * p).sum(-1, keepdims=True))
    ds = dscores.astype("float32")
    assert_within(ds, round16(want_ds, kind), crossing16(want_ds, path_atol(want_ds, length), kind), "dscores")
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)
    assert_within(dq, ds.astype("float64") @ k, matmul16_atol(ds, k, kind, sides=1), "dq")
    assert_within(dk, ds.astype("float64").swapaxes(-1, -2) @ q,
                  matmul16_atol(ds.swapaxes(-1, -2), q, kind, sides=1), "dk")
    assert_within(dv, round16(probs, kind).swapaxes(-1, -2) @ d_out,
                  matmul16_atol(probs.swapaxes(-1, -2), dmixed.transpose(0, 2, 1, 3), kind, sides=1), "dv")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 37), (2, 3, 300), (5, 2, 1)], ids=["images", "over-a-block", "bn1d"])
def test_batch_norm_forward_and_backward(shape, affine):
    """batch_norm_forward and batch_norm_backward (one block per channel) against Ops.batch_norm, in training
    (the batch's statistics; the running ones and the batch count updated in place) and in eval (the running
    ones, updated by nothing), within the float32 chain's bound of the sums over each channel."""
    n, c, length = shape
    r = rng(21)
    x = (r.standard_normal(shape) * 2 + 0.5).astype("float32")
    dy = r.standard_normal(shape).astype("float32")
    w, b = r.standard_normal(c).astype("float32"), r.standard_normal(c).astype("float32")
    chain = 4 * n * length + 6
    for training in (True, False):
        stats = [r.standard_normal(c).astype("float32"), r.uniform(0.5, 2, c).astype("float32"),
                 numpy.array(7, "int64")]
        want_stats = [a.copy() for a in stats]
        want_y, want_xhat, want_rstd = REFERENCE.batch_norm(x, w if affine else None, b if affine else None,
                                                            *want_stats, training, 0.1, 1e-5)
        y, xhat, rstd = numpy.full_like(x, numpy.nan), numpy.full_like(x, numpy.nan), numpy.full(c, numpy.nan, "float32")
        unbiased = 0.1 * n * length / (n * length - 1)
        run("batch_norm", "batch_norm_forward", c, THREADS, x, w, b, stats[0], stats[1], stats[2], y, xhat, rstd, n, c,
            length, 0.1, unbiased, 1e-5, int(affine), int(training))
        for got, want, name in ((y, want_y, "y"), (xhat, want_xhat, "xhat"), (rstd, want_rstd.reshape(c), "rstd"),
                                (stats[0], want_stats[0], "running_mean"), (stats[1], want_stats[1], "running_var")):
            assert_within(got, want, path_atol(want, chain), f"{name}, training={training}")
        assert stats[2] == want_stats[2] == (8 if training else 7)
        grads = numpy.full((2, c), numpy.nan, "float32")
        want_grads = numpy.full((2, c), numpy.nan, "float32")
        want_dx = REFERENCE.batch_norm_backward(dy, want_xhat, want_rstd, w if affine else None, want_grads[0],
                                                want_grads[1], training)
        dx = numpy.full_like(x, numpy.nan)
        run("batch_norm", "batch_norm_backward", c, THREADS, dy, xhat, rstd, w, grads[0], grads[1], dx, n, c, length,
            int(affine), int(training))
        assert_within(dx, want_dx, path_atol(want_dx, 2 * chain), f"dx, training={training}")
        if affine:
            for got, want, name in ((grads[0], want_grads[0], "grad_weight"), (grads[1], want_grads[1], "grad_bias")):
                assert_within(got, want, path_atol(want, chain), f"{name}, training={training}")
        else:
            assert numpy.isnan(grads).all()  # nothing written


@pytest.mark.parametrize("positions", [False, True])
def test_embedding_forward_and_backward(positions):
    """Repeated ids, an id used by no row, fewer positions used than the table has, a row wider than a block."""
    b, t, v, d, p = 3, 5, 9, THREADS + 7, 6
    r = rng(9)
    ids = r.integers(0, v - 1, (b, t)).astype("int64")  # the last id is never used
    weight, position = r.standard_normal((v, d)).astype("float32"), r.standard_normal((p, d)).astype("float32")
    y, id_error = numpy.full((b, t, d), numpy.nan, "float32"), NO_RANGE_ERROR.copy()
    run("embedding", "embedding_forward", 4, 64, ids, weight, position, y, id_error, ids.size, t, d, v, int(positions))
    numpy.testing.assert_array_equal(y, REFERENCE.embed(ids, weight, position if positions else None))
    numpy.testing.assert_array_equal(id_error, NO_RANGE_ERROR)  # no id out of range
    dy = r.standard_normal((b, t, d)).astype("float32")
    want_w, want_p = numpy.full_like(weight, numpy.nan), numpy.full_like(position, numpy.nan)
    REFERENCE.embed_backward(ids, dy, want_w, want_p if positions else None)
    got_w, got_p = numpy.full_like(weight, numpy.nan), numpy.full_like(position, numpy.nan)
    run("embedding", "embedding_backward", v + (p if positions else 0), THREADS, ids, dy, got_w, got_p, ids.size, t, d,
        v, int(positions))
    # each row a sum of the dy rows of its id (of its position): at most b t of them, in any order
    abs_w, abs_p = numpy.full_like(want_w, numpy.nan, "float64"), numpy.full_like(want_p, numpy.nan, "float64")
    REFERENCE.embed_backward(ids, numpy.abs(dy.astype("float64")), abs_w, abs_p if positions else None)
    assert_within(got_w, want_w, numpy.nan_to_num(2 * gamma(ids.size) * abs_w, nan=0.0), "weight gradient")
    if positions:
        assert_within(got_p, want_p, 2 * gamma(b) * abs_p, "position gradient")
    else:
        assert numpy.isnan(got_p).all()  # not written


def test_embedding_ids_out_of_range_give_nan_rows_and_are_flagged():
    ids = numpy.array([[3, -2, 0], [9, 4, 12]], dtype="int64")  # V = 9: -2, 9 and 12 are out of range
    weight = rng(1).standard_normal((9, 70)).astype("float32")
    y, id_error = numpy.zeros((2, 3, 70), "float32"), NO_RANGE_ERROR.copy()
    run("embedding", "embedding_forward", 3, 64, ids, weight, weight, y, id_error, ids.size, 3, 70, 9, 0)
    assert id_error.tolist() == [-2, 12]
    bad = (ids < 0) | (ids >= 9)
    assert numpy.isnan(y[bad]).all() and (y[~bad] == weight[ids[~bad]]).all()


@pytest.mark.parametrize("activation", [a for a in ACTIVATION_CODES if a])
def test_activation_forward_and_backward(activation):
    x, dy = (rng(i).standard_normal(1001).astype("float32") * 3 for i in range(2))
    y = numpy.full_like(x, numpy.nan)
    run("gemm", "activation_forward", 3, 64, x, y, x.size, ACTIVATION_CODES[activation])
    assert_within(y, REFERENCE.activation(activation, x), bias_act_atol(0.0, x, activation), "activation")
    dx = numpy.full_like(x, numpy.nan)
    run("gemm", "activation_backward", 3, 64, x, y, dy, dx, x.size, ACTIVATION_CODES[activation])
    assert_within(dx, REFERENCE.activation_backward(activation, x, y, dy), activation_grad_atol(dy, activation),
                  "activation_backward")


# Random123's kat_vectors for philox4x32_10: counter, key -> output
PHILOX_KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
              ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
              ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
               (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox4x32_10_known_answers(counter, key, expected):
    counters = numpy.array([counter] * 5, dtype=numpy.uint32)
    out = numpy.zeros_like(counters)
    key64 = key[0] | key[1] << 32
    run("random", "philox4x32_10_blocks", 2, 2, counters.view("int32"), out.view("int32"), 5,
        key64 - 2**64 if key64 >= 2**63 else key64)
    assert out.tolist() == [list(expected)] * 5


@pytest.mark.parametrize("step_on_device", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n", [1, 6, 4 * 3 * 64 + 3])
def test_dropout_gives_the_cpu_mask_bit_for_bit(n, residual, step_on_device):
    """Fewer blocks than the data needs; a size not a multiple of 4; with the fused residual add; with
    the step read from the device (a replayed graph's) rather than from its argument."""
    from gpunet import random

    x, r = (rng(n + i).standard_normal(n).astype("float32") for i in range(2))
    stream = (2**40 + 17, 9, 3, 1)
    want, _ = REFERENCE.dropout(x, 0.3, stream, r if residual else None)
    y = numpy.full_like(x, numpy.nan)
    step_source = numpy.array([stream[1]], dtype=numpy.uint32)
    run("random", "dropout", 2, 64, x, r if residual else x, y, n, stream[0], 77 if step_on_device else stream[1],
        stream[2], stream[3], random.dropout_threshold(0.3), numpy.float32(1 / 0.7), residual, step_source,
        step_on_device)
    assert y.tobytes() == want.tobytes()


@pytest.mark.parametrize("kernel, kind", [("dropout_bf16", "bf16"), ("dropout_f16", "fp16")])
@pytest.mark.parametrize("residual", [False, True])
def test_dropout16_writes_the_cpu_result_and_its_16bit_copy(kernel, kind, residual):
    """random.cu's dropout_bf16 / _f16: y is the CPU's bit for bit (the float32 kernel's), and beside it y rounded to
    nearest even into the 16-bit format, what the next product's cast would give."""
    import ml_dtypes

    from gpunet import random

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kind == "bf16" else numpy.float16)
    n = 4 * 3 * 64 + 3
    x, r = (rng(n + i).standard_normal(n).astype("float32") * 1e3 for i in range(2))  # (fp16: some round far)
    stream = (2**40 + 17, 9, 3, 1)
    want, _ = REFERENCE.dropout(x, 0.3, stream, r if residual else None)
    y, y16 = numpy.full_like(x, numpy.nan), numpy.zeros(n, dtype)
    run("random", kernel, 2, 64, x, r if residual else x, y, n, stream[0], stream[1], stream[2], stream[3],
        random.dropout_threshold(0.3), numpy.float32(1 / 0.7), residual, numpy.zeros(1, numpy.uint32), 0, y16)
    assert y.tobytes() == want.tobytes()
    assert y16.tobytes() == want.astype(dtype).tobytes() and (want != want.astype(dtype).astype("float32")).any()


@pytest.mark.parametrize("momentum, nesterov, decay, first", [(0.0, False, 0.0, True), (0.9, True, 0.01, False),
                                                              (0.9, False, 0.0, True)])
def test_sgd_update(momentum, nesterov, decay, first):
    r = rng(3)
    param, grad, velocity = (r.standard_normal(777).astype("float32") for _ in range(3))
    want_p, want_v = param.copy(), velocity.copy()
    REFERENCE.sgd_update(want_p, grad, want_v, 0.1, momentum, 0.0, decay, nesterov, first)
    start = param.copy(), velocity.copy()
    for on_device in (0, 1):  # lr as an argument; lr read from the device (the argument then unused)
        param, velocity = start[0].copy(), start[1].copy()
        run("optim", "sgd_update", 2, 64, param, grad, velocity, param.size, 0.0 if on_device else 0.1, momentum,
            0.0, decay, nesterov, first, numpy.array([0.1], "float32"), on_device)
        # elementwise: g = grad + decay p, v = momentum v + g, g + momentum v, p - lr g: at most 7 roundings
        # of the terms' size |p| + lr (|grad| + |p| + |v|) (1 + momentum)^2 on each side
        size = (numpy.abs(start[0]) + 0.1 * (numpy.abs(grad) + numpy.abs(start[0]) + numpy.abs(start[1])) * 4)
        assert_within(param, want_p, elementwise_atol(size, 7), "param")
        if momentum:
            assert_within(velocity, want_v, elementwise_atol(4 * (numpy.abs(grad) + numpy.abs(start[0])
                                                                  + numpy.abs(start[1])), 7), "velocity")


@pytest.mark.parametrize("decoupled, decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_adam_update(decoupled, decay):
    r = rng(4)
    param, grad, m = (r.standard_normal(777).astype("float32") for _ in range(3))
    v = numpy.abs(r.standard_normal(777)).astype("float32")
    want = [a.copy() for a in (param, m, v)]
    REFERENCE.adam_update(want[0], grad, want[1], want[2], 1e-2, 0.9, 0.999, 1e-8, decay, decoupled, 3)
    start = [a.copy() for a in (param, m, v)]
    scalars = numpy.array([1e-2, 1 - 0.9**3, (1 - 0.999**3) ** 0.5], "float32")
    for on_device in (0, 1):  # the step's scalars as arguments, or read from the device (arguments unused)
        param, m, v = (a.copy() for a in start)
        arguments = (0.0, 1.0, 1.0) if on_device else (1e-2, 1 - 0.9**3, (1 - 0.999**3) ** 0.5)
        run("optim", "adam_update", 2, 64, param, grad, m, v, param.size, arguments[0], 0.9, 0.999, 1e-8, decay,
            decoupled, *arguments[1:], scalars, on_device)
        for got, expected, bound, name in zip((param, m, v), want, adam_atol(start, grad, want, decay), "pmv"):
            assert_within(got, expected, bound, name)


def adam_atol(start, grad, want, decay, lr=1e-2, beta1=0.9, beta2=0.999, step=3):
    """Elementwise on both sides, so no sum. m and v are two products and a sum each (3 roundings
    of their terms, the decay one more), and the kernel's 1 - beta (from beta in float32) differs
    from the reference's (1 - beta in float64, then float32) by u beta / (1 - beta) relative: 9 u
    for beta1, 999 u for beta2. The step lr m^ / (sqrt(v^) + eps) is about 12 roundings (the bias
    corrections, a sqrt, a division) of its own size, plus what the errors of m and v carry; the
    parameter's subtraction one rounding of |p| + |step|. Two sides."""
    p0, m0, v0 = (a.astype("float64") for a in start)
    g = numpy.abs(grad.astype("float64")) + decay * numpy.abs(p0)
    m_err = 2 * 4 * 2 * U * (beta1 * numpy.abs(m0) + (1 - beta1) * g) + U * beta1 * g
    v_err = 2 * 4 * 2 * U * (beta2 * v0 + (1 - beta2) * g * g) + U * beta2 * g * g
    denom = numpy.sqrt(want[2].astype("float64")) / (1 - beta2**step) ** 0.5 + 1e-8
    step_size = numpy.abs(want[0] - p0)
    step_err = 2 * 12 * 2 * U * step_size + lr / (1 - beta1**step) * m_err / denom \
        + step_size * v_err / (2 * want[2].astype("float64") + 1e-30)
    return (2 * 2 * U * (numpy.abs(p0) + step_size) + step_err + ulps(want[0], 1),
            m_err + ulps(want[1], 1), v_err + ulps(want[2], 1))


@pytest.mark.parametrize("max_norm", [0.5, 0.1, 1e6, float("nan")], ids=["clips", "clips-inexact", "leaves", "nan"])
def test_sum_squares_and_clip_by_norm(max_norm):
    """Fewer blocks than the data needs in both; the clip's grid differs from the partials'. With
    seed 6, max_norm 0.1 as a float32 (not the CPU's double) would round the scale 1 ulp apart."""
    grad = rng(6).standard_normal(3 * THREADS + 77).astype("float32")
    want = grad.copy()
    want_norm = REFERENCE.clip_grad_norm([want], max_norm)
    partial, norm = numpy.full(3, numpy.nan), numpy.full(1, numpy.nan)
    run("optim", "sum_squares", 3, THREADS, grad, grad.size, partial)
    # partials accumulate in float64 (u = 2^-53): 1e-12 is 2^-40, room for sums of 2^13 terms (here 845)
    numpy.testing.assert_allclose(partial.sum(), numpy.dot(grad.astype("float64"), grad.astype("float64")), rtol=1e-12)
    run("optim", "clip_by_norm", 2, THREADS, grad, grad.size, partial, 3, max_norm, norm)
    numpy.testing.assert_allclose(norm[0], want_norm, rtol=1e-12)
    # max_norm reaches the kernel as a double: the scale is the CPU's to the bit, even for 0.1
    numpy.testing.assert_array_equal(grad, want)


# The emulator itself, on small kernels written here.
PROBES = (Path(__file__).parents[1] / "cuda" / "probes.cu").read_text()


def probes():
    return compiled(PROBES, "probes")


def fill_args(module, out):
    return marshal(module, "fill", (out, out.size, 2.5))


@pytest.mark.parametrize("grid, block, shared, message", [
    ((1, 1, 1), (1025, 1, 1), 0, "blockDim.x = 1025 is over the limit 1024"),
    ((1, 1, 1), (41, 25, 1), 0, "1025 threads per block is over the limit 1024"),
    ((1, 1, 1), (1, 1, 65), 0, "blockDim.z = 65 is over the limit 64"),
    ((1, 65536, 1), (32, 1, 1), 0, "gridDim.y = 65536 is over the limit 65535"),
    ((2**31, 1, 1), (32, 1, 1), 0, "gridDim.x = 2147483648 is over the limit"),
    ((0, 1, 1), (32, 1, 1), 0, "must have every dimension >= 1"),
    ((1, 1, 1), (0, 1, 1), 0, "must have every dimension >= 1"),
    ((1, 1, 1), (32, 1, 1), 49 * 1024, "50176 bytes of dynamic + 0 of static shared memory is over the limit 49152"),
])
def test_launch_limits_refuse_before_running(grid, block, shared, message):
    module, out = probes(), numpy.zeros(8, "float32")
    with pytest.raises(LaunchError, match=f"kernel fill: .*{re.escape(message)}"):
        module.launch("fill", grid, block, fill_args(module, out), shared_mem=shared)
    assert not out.any()  # nothing ran
    module.launch("fill", 1, 1024, fill_args(module, out), shared_mem=48 * 1024)  # at the limits: fine
    numpy.testing.assert_array_equal(out, 2.5)


def test_launch_refuses_too_many_registers(monkeypatch):
    module, out = probes(), numpy.zeros(8, "float32")
    if module.resources is None:
        pytest.skip("nvcc is not on this machine: register counts unknown")
    registers = module.resources["fill"][0]
    monkeypatch.setitem(cuda_emulator.LIMITS, "max_registers_per_block", registers * 64 - 1)
    with pytest.raises(LaunchError, match=f"{registers} registers x 64 threads is over the limit"):
        module.launch("fill", 1, 64, fill_args(module, out))
    module.launch("fill", 1, 63, fill_args(module, out))


@pytest.mark.parametrize("args, message", [
    (lambda out: [out.ctypes.data, bytes(8), bytes(4)], r"parameter 1 is a 4-byte int: expected 4 bytes, got 8"),
    (lambda out: [out.ctypes.data, out.ctypes.data, bytes(4)], r"parameter 1 is a 4-byte int: .*got int"),
    (lambda out: [bytes(8), bytes(4), bytes(4)], r"parameter 0 is a pointer: expected an int address, got bytes"),
    (lambda out: [out.ctypes.data, bytes(4)], r"kernel fill takes 3 arguments, got 2"),
])
def test_arguments_are_checked_against_the_kernel_signature(args, message):
    module, out = probes(), numpy.zeros(8, "float32")
    assert [(p.kind, p.size) for p in module.kernels["fill"].params] == [("pointer", 8), ("int", 4), ("float", 4)]
    with pytest.raises(TypeError, match=message):
        module.launch("fill", 1, 32, args(out))


def test_warp_shuffles_and_votes_match_numpy():
    module = probes()
    x = rng(7).standard_normal(128).astype("float32")
    outs = [numpy.zeros(128, "float32") for _ in range(4)] + [numpy.zeros(128, "int32"), numpy.zeros(128, "uint32")]
    module.launch("warp_ops", 2, 64, marshal(module, "warp_ops", (x, *outs)))
    all_sum, lane0_sum, scan, seg8, reversed_ids, ballot = outs
    warps = x.reshape(4, 32)
    # sums of 32 (a warp), of each prefix and of 8 (a segment): butterfly or sequential, 2 gamma_K sum|x|
    assert_within(all_sum, numpy.repeat(warps.sum(1), 32), numpy.repeat(sum_atol(warps, 1), 32), "all_sum")
    assert_within(lane0_sum[::32], warps.sum(1), sum_atol(warps, 1), "lane0_sum")
    assert_within(scan, numpy.cumsum(warps, axis=1).reshape(-1),
                  (2 * gamma(32) * numpy.cumsum(numpy.abs(warps), axis=1)).reshape(-1), "scan")
    assert_within(seg8, numpy.repeat(x.reshape(16, 8).sum(1), 8), numpy.repeat(sum_atol(x.reshape(16, 8), 1), 8),
                  "seg8")
    ids = numpy.arange(64)
    numpy.testing.assert_array_equal(reversed_ids, numpy.tile(ids // 32 * 32 + 31 - ids % 32, 2))
    bits = [sum(1 << lane for lane in range(32) if w[lane] > 0) for w in warps]
    numpy.testing.assert_array_equal(ballot, numpy.repeat(numpy.array(bits, "uint32"), 32))


@pytest.mark.parametrize("how, block, message", [
    (0, 64, r"returned while 16 threads wait at __syncthreads|reached __syncthreads \(line \d+\) after"),
    (1, 64, r"divergent __syncthreads: thread \(\d+,0,0\) waits at line \d+, thread \(\d+,0,0\) reached the one"),
    (2, 32, r"\(warp 0 lane 3\) returned while lane \d+ waits for it|for lane 3, which has returned"),
    (3, 16, r"mask 0xffffffff, naming lane 31 beyond the block's 16 threads"),
    (4, 64, r"deadlock: 33 threads wait at __syncthreads .* 31 in warp collectives; .* for lane 0"),
    (6, 64, r"thread \(\d+,0,0\): assertion failed: threadIdx.x < 5"),
])
def test_misbehaving_kernels_raise_kernel_fault(how, block, message):
    module, out = probes(), numpy.zeros(64, "float32")
    with pytest.raises(KernelFault, match=r"faults: block \(0,0,0\) .*" + message):
        module.launch("faults", 1, block, marshal(module, "faults", (out, how)))
    module.launch("faults", 1, 64, marshal(module, "faults", (out, 9)))  # the module still works
    numpy.testing.assert_array_equal(out, numpy.arange(64))


@pytest.mark.skipif(TSAN, reason="memory faults are caught in the normal build only")
def test_invalid_memory_access_and_stack_overflow_raise_kernel_fault():
    module, out = probes(), numpy.zeros(64, "float32")
    with pytest.raises(KernelFault, match=r"thread \(\d+,0,0\): invalid memory access at address (0x[0-9a-f]+|\(nil\))"):
        module.launch("faults", 1, 64, marshal(module, "faults", (out, 5)))
    with pytest.raises(KernelFault, match=r"overflow: .* thread \(\d+,0,0\): stack overflow \(a thread has 256 KB"):
        module.launch("overflow", 1, 64, marshal(module, "overflow", (out, 100000)))


def test_blocks_run_in_a_shuffled_order_with_the_same_result():
    module = probes()
    orders = []
    for _ in range(2):
        counter, order, out = numpy.zeros(1, "int32"), numpy.full(16, -1, "int32"), numpy.zeros(16 * 32, "float32")
        module.launch("record_order", 16, 32, marshal(module, "record_order", (counter, order, out)))
        assert counter[0] == 16 and sorted(order) == list(range(16))
        numpy.testing.assert_array_equal(out, (numpy.arange(16)[:, None] * 100 + numpy.arange(32)).ravel())
        orders.append(order.tolist())
    assert orders[0] != list(range(16)) and orders[1] != orders[0]  # shuffled, and afresh per launch


@pytest.mark.parametrize("shape, pool", [((2, 3, 8, 8), (2, 2)), ((1, 2, 9, 7), (3, 2))])  # (7: a column past the windows)
def test_conv_relu_pool_and_backward(shape, pool):
    n, c, oh, ow = shape
    r = rng(7)
    y_t, bias = r.standard_normal((c, n, oh * ow)).astype("float32"), r.standard_normal(c).astype("float32")
    y = numpy.maximum(y_t.transpose(1, 0, 2).reshape(shape) + bias.reshape(1, c, 1, 1), 0)
    y[0, 0, :2, :2] = 0.0  # a window of zeros: its first position wins, and no gradient passes
    b = bias.reshape(1, c, 1, 1)  # pre-activations: -1 where y is 0, so relu gives 0 there
    y_t = numpy.ascontiguousarray(numpy.where(y == 0, -1.0 - b, y - b).astype("float32")
                                  .reshape(n, c, -1).transpose(1, 0, 2))
    want_p, want_arg = REFERENCE.max_pool(y, pool, pool)
    ph, pw = want_p.shape[2:]
    pooled, arg = numpy.full((n, c, ph, pw), numpy.nan, "float32"), numpy.full((n, c, ph, pw), -1, "int32")
    geometry = (n, c, oh, ow, ph, pw, *pool)
    run("gemm", "conv_relu_pool", 3, THREADS, y_t, bias, pooled, arg, *geometry, 1)
    # y_t + bias rounds once (the pre-activations were built so that it is y's bits or -1): one ulp
    assert_within(pooled, want_p, ulps(want_p, 1), "pooled")
    numpy.testing.assert_array_equal(arg.reshape(-1), want_arg)
    dp = r.standard_normal(pooled.shape).astype("float32")
    dz_t, grad_bias = numpy.full((c, n * oh * ow), numpy.nan, "float32"), numpy.full(c, numpy.nan, "float32")
    run("gemm", "conv_relu_pool_backward", c, THREADS, dp, pooled, arg, dz_t, grad_bias, *geometry, 1)
    dy = REFERENCE.max_pool_backward(dp * (want_p > 0), want_arg, shape, pool, pool)
    numpy.testing.assert_array_equal(dz_t, dy.transpose(1, 0, 2, 3).reshape(c, -1))  # copies of dp: exact
    assert_within(grad_bias, dy.sum(axis=(0, 2, 3)), sum_atol(dy, (0, 2, 3)), "grad_bias")

# fp16 loss scaling's kernels (gpunet.training.loss_scale; the fit-level tests are tests/test_loss_scale.py)
from gpunet.training import loss_scale  # noqa: E402


def emulated_state(scale=2.0**16, found=False, applied=0) -> numpy.ndarray:
    words = numpy.zeros(loss_scale.WORDS, dtype=numpy.uint32)
    words[loss_scale.APPLIED] = applied
    state = words.view(numpy.float32)
    state[loss_scale.SCALE], state[loss_scale.FOUND] = scale, float(found)
    return state


@pytest.mark.parametrize("bad", [None, 5, 700], ids=["finite", "inf-in-block-0", "nan-in-a-later-block"])
def test_unscale_check_is_the_hosts_product_and_flags_what_is_not_finite(bad):
    """Three blocks over 3 * 256 + 77 values (the grid-stride loop too): each value times float32(1 / scale)
    bit for bit as the host multiplies, and the found word 1 iff a result is inf or NaN."""

    grad = numpy.random.default_rng(6).standard_normal(3 * THREADS + 77).astype("float32") * 2.0**20
    if bad is not None:
        grad[bad] = numpy.inf if bad == 5 else numpy.nan
    want = grad * numpy.float32(1.0 / 2.0**15)
    state = emulated_state(2.0**15)
    run("optim", "unscale_check", 2, THREADS, grad, grad.size, state)
    numpy.testing.assert_array_equal(grad, want)
    assert state[loss_scale.FOUND] == (0.0 if bad is None else 1.0)


@pytest.mark.parametrize("found", [False, True])
@pytest.mark.parametrize("first_at", [3, 2])
def test_the_scaled_updates_are_the_plain_ones_or_write_nothing(found, first_at):
    """sgd_update_scaled and adam_update_scaled: with the found word set nothing is written; else they are
    sgd_update (first step iff the applied count is first_at) and adam_update at step applied + 1 (the bias
    corrections as the host's adam_scalars, in double then float), bit for bit. clip_by_norm_scaled likewise."""
    from gpunet.backend.ops import adam_scalars

    r = numpy.random.default_rng(7)
    param, grad, m, v = (r.standard_normal(777).astype("float32") for _ in range(4))
    v = numpy.abs(v)
    state, record = emulated_state(found=found, applied=3), numpy.array([0.05, 0.0, 0.0], "float32")
    for on_device in (0, 1):
        want_p, want_v, got_p, got_v = param.copy(), m.copy(), param.copy(), m.copy()
        if not found:
            run("optim", "sgd_update", 2, 64, want_p, grad, want_v, param.size, 0.05, 0.9, 0.5, 0.01, 0,
                first_at == 3, record, on_device)
        run("optim", "sgd_update_scaled", 2, 64, got_p, grad, got_v, param.size, 0.0 if on_device else 0.05, 0.9,
            0.5, 0.01, 0, 1, first_at, record, on_device, state)
        assert numpy.array_equal(got_p, want_p) and numpy.array_equal(got_v, want_v)
        want = [a.copy() for a in (param, m, v)]
        got = [a.copy() for a in (param, m, v)]
        if not found:
            _, bias1, bias2_sqrt = adam_scalars(0.05, 0.9, 0.999, 4)
            run("optim", "adam_update", 2, 64, want[0], grad, want[1], want[2], param.size, 0.05, 0.9, 0.999, 1e-8,
                0.01, 1, bias1, bias2_sqrt, record, 0)
        run("optim", "adam_update_scaled", 2, 64, got[0], grad, got[1], got[2], param.size,
            0.0 if on_device else 0.05, 0.9, 0.999, 1e-8, 0.01, 1, record, on_device, state)
        assert all(numpy.array_equal(a, b) for a, b in zip(got, want))
    big = r.standard_normal(3 * THREADS + 77).astype("float32")
    partial, norm = numpy.zeros(3), numpy.zeros(1)
    want = big.copy()
    run("optim", "sum_squares", 3, THREADS, big, big.size, partial)
    if not found:
        run("optim", "clip_by_norm", 2, THREADS, want, want.size, partial, 3, 0.5, norm)
    run("optim", "clip_by_norm_scaled", 2, THREADS, big, big.size, partial, 3, 0.5, norm, state)
    assert numpy.array_equal(big, want)


@pytest.mark.parametrize("growth_interval", [1, 3])
def test_loss_scale_update_in_the_emulator_is_the_hosts_rule(growth_interval):
    """One thread of a launch of 32 (the wrapper's), word for word against the host's rule."""

    reference, state = loss_scale.LossScaler(growth_interval=growth_interval), emulated_state()
    for bad in [False] * 5 + [True] + [False] * 7 + [True, True] + [False] * 20 + [True] + [False] * 3:  # (as FOUND of
        # tests/test_loss_scale.py: overflows after growth, twice in a row, and once more after 20 clean steps)
        state[loss_scale.FOUND] = float(bad)
        run("optim", "loss_scale_update", 1, 32, state, growth_interval, 2.0, 0.5, loss_scale.RING)
        reference.found = bad
        reference.update()
        words = state.view(numpy.uint32)
        assert (float(state[loss_scale.SCALE]), int(words[loss_scale.TRACKER]), int(words[loss_scale.SKIPPED]),
                int(words[loss_scale.APPLIED]), int(words[loss_scale.ATTEMPTED]), state[loss_scale.FOUND]) == (
            reference.scale_value, reference.tracker, reference.skipped, reference.applied, reference.attempted, 0.0)
        assert numpy.array_equal(state[loss_scale.RING_START:] != 0, reference.ring)


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_precision_casts_round_to_nearest_even_as_numpy_does(kind):
    """kernels/precision.cu in the emulator, bit for bit against NumPy / ml_dtypes (exhaustive checks of the
    conversions themselves: tests/kernels/test_fp16_emulation.py)."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kind == "bf16" else numpy.float16)
    x = rng(9).standard_normal(3 * THREADS + 77).astype("float32") * 300
    with numpy.errstate(over="ignore"):
        want = x.astype(dtype)
    short, back, trip = numpy.zeros(x.size, dtype), numpy.zeros(x.size, "float32"), numpy.zeros(x.size, "float32")
    to_short, to_float, round_trip = {"bf16": ("cast_f32_to_bf16", "cast_bf16_to_f32", "round_trip_bf16"),
                                      "f16": ("cast_f32_to_f16", "cast_f16_to_f32", "round_trip_f16")}[kind]
    run("precision", to_short, 2, THREADS, x, short, x.size)
    run("precision", to_float, 2, THREADS, short, back, x.size)
    run("precision", round_trip, 2, THREADS, x, trip, x.size)
    assert numpy.array_equal(short.view(numpy.uint16), want.view(numpy.uint16))
    assert numpy.array_equal(back, want.astype("float32")) and numpy.array_equal(trip, back)


@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
@pytest.mark.parametrize("kernel", ["gemm16_bf16", "gemm16_f16", "gemm16_tc_bf16", "gemm16_tc_f16"])
def test_gemm16_multiplies_16bit_operands_exactly_and_sums_in_float32(kernel, transposed):
    """kernels/gemm16.cu (gemm16_bf16, gemm16_f16, and on the tensor cores gemm16_tc_bf16, gemm16_tc_f16
    through the emulator's nvcuda::wmma, tests/cuda/mma.h) in the emulator: the 16-bit operands' float32 values give
    the float32 GEMM's result within its bound (each product of two 16-bit numbers is exact in float32), read
    row-major or through transposing strides (the backward's dz . W and dz^T . x), with the epilogue."""
    import ml_dtypes

    dtype = numpy.dtype(ml_dtypes.bfloat16 if kernel.endswith("bf16") else numpy.float16)
    rows, cols = (64, 32) if "_tc_" in kernel else (TILE_M, TILE_N)  # (gemm16_tc: nvcuda::wmma, 64 x 32 a block)
    m, k, n = 70, 33, 130
    r = rng(m + k)
    x, w = (r.standard_normal(s).astype("float32").astype(dtype) for s in ((m, k), (n, k)))
    b = r.standard_normal(n).astype("float32")
    x32, w32 = x.astype("float32"), w.astype("float32")
    if transposed:  # A[r, k] = a[k, r] (strides 1, M); W[c, k] = wt[k, c] (strides 1, N)
        a, a_strides, wt, w_strides = numpy.ascontiguousarray(x.T), (1, m), numpy.ascontiguousarray(w.T), (1, n)
    else:
        a, a_strides, wt, w_strides = x, (k, 1), w, (k, 1)
    for activation in (None, "relu", "gelu"):
        out = numpy.full((m, n), numpy.nan, "float32")
        run("gemm16", kernel, (-(-n // cols), 1), THREADS, a, *a_strides, wt, *w_strides, b, out, m, n, k,
            1, ACTIVATION_CODES[activation])
        assert_within(out, REFERENCE.linear(x32, w32, b, activation), linear_atol(x32, w32, b, activation), "gemm16")
    out[:] = numpy.nan
    run("gemm16", kernel, (-(-n // cols), -(-m // rows)), THREADS, a, *a_strides, wt, *w_strides, out,
        out, m, n, k, 0, 0)  # no bias (the bias argument is any float array, unread)
    assert_within(out, x32.astype("float64") @ w32.T.astype("float64"), linear_atol(x32, w32, None, None), "no bias")
