"""The CUDA kernels' logic, run on the CPU by a thread-per-CUDA-thread emulator (g++), against
the NumPy reference Ops: index arithmetic, tiling edges, padding, strides, reductions.
On a GPU, tests/test_ops_backends.py runs the same kernels for real."""
from __future__ import annotations

import numpy
import pytest

from gpunet.backend.cupy_ops import ACTIVATION_CODES, ROWS_PER_CHUNK
from gpunet.backend.ops import Ops, pooled_size
from tests.conftest import rng
from tests.cuda_emulator import call, library

REFERENCE = Ops()


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return library(str(tmp_path_factory.mktemp("emulator")))


@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
@pytest.mark.parametrize("shape", [(1, 1, 1), (70, 33, 130), (64, 16, 64)], ids=lambda s: "x".join(map(str, s)))
def test_gemm_bias_act(lib, shape, activation):
    m, k, n = shape
    r = rng(m * n)
    x, w, b = (r.standard_normal(s).astype("float32") for s in ((m, k), (n, k), (n,)))
    out = numpy.full((m, n), numpy.nan, "float32")
    call(lib, "gemm_bias_act", -(-n // 64), -(-m // 64), x, w, b, out, m, n, k, 1, ACTIVATION_CODES[activation])
    numpy.testing.assert_allclose(out, REFERENCE.linear(x, w, b, activation), rtol=1e-5, atol=1e-5)
    call(lib, "gemm_bias_act", -(-n // 64), -(-m // 64), x, w, b, out, m, n, k, 0, ACTIVATION_CODES[activation])
    numpy.testing.assert_allclose(out, REFERENCE.linear(x, w, None, activation), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", list(ACTIVATION_CODES))
def test_bias_act_backward(lib, activation):
    m, n = 150, 300  # three row chunks, two column blocks
    r = rng(5)
    z, dy = r.standard_normal((m, n)).astype("float32"), r.standard_normal((m, n)).astype("float32")
    y = REFERENCE.activation(activation, z) if activation else z
    want = REFERENCE.activation_backward(activation, z, y, dy) if activation else dy
    chunks = -(-m // ROWS_PER_CHUNK)
    dz, partial = numpy.zeros_like(dy), numpy.zeros((chunks, n), "float32")
    call(lib, "bias_act_backward", -(-n // 256), chunks, dy, z, y, dz, partial, m, n, ROWS_PER_CHUNK,
         ACTIVATION_CODES[activation], 1)
    numpy.testing.assert_allclose(dz, want, rtol=1e-5, atol=1e-6)
    numpy.testing.assert_allclose(partial.sum(axis=0), want.sum(axis=0), rtol=1e-4, atol=1e-4)


GEOMETRIES = [((2, 3, 9, 11), (3, 3), (1, 1), (1, 1)), ((3, 2, 12, 10), (5, 5), (2, 2), (2, 2)),
              ((1, 2, 7, 6), (2, 3), (3, 2), (0, 1))]


@pytest.mark.parametrize("blocks, threads", [(1, 1), (3, 64)])
@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES)
def test_im2col_and_col2im(lib, shape, kernel, stride, padding, blocks, threads):
    x = rng().standard_normal(shape).astype("float32")
    oh, ow = pooled_size(shape[2:], kernel, stride, padding)
    geometry = (*shape, *kernel, *stride, *padding, oh, ow)
    want = REFERENCE.im2col(x, kernel, stride, padding)
    cols = numpy.full(want.shape, numpy.nan, "float32")
    call(lib, "im2col", blocks, threads, x, cols, *geometry)
    numpy.testing.assert_array_equal(cols, want)
    dcols = rng(1).standard_normal(want.shape).astype("float32")
    dx = numpy.full(shape, numpy.nan, "float32")
    call(lib, "col2im", blocks, threads, dcols, dx, *geometry)
    numpy.testing.assert_allclose(dx, REFERENCE.col2im(dcols, shape, kernel, stride, padding), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, kernel, stride", [((2, 3, 8, 8), (2, 2), (2, 2)), ((1, 2, 9, 7), (3, 2), (2, 3))])
def test_max_pool_and_backward(lib, shape, kernel, stride):
    x = rng().standard_normal(shape).astype("float32")
    x[0, 0, 0, :2] = 5.0  # a tie inside one window: the first maximum wins, as in torch
    oh, ow = pooled_size(shape[2:], kernel, stride)
    geometry = (*shape, *kernel, *stride, 0, 0, oh, ow)
    want_y, want_arg = REFERENCE.max_pool(x, kernel, stride)
    y, arg = numpy.zeros((shape[0], shape[1], oh, ow), "float32"), numpy.zeros((shape[0], shape[1], oh, ow), "int32")
    call(lib, "max_pool", 2, 32, x, y, arg, *geometry)
    numpy.testing.assert_array_equal(y, want_y)
    numpy.testing.assert_array_equal(arg.reshape(-1), want_arg)
    dy = rng(1).standard_normal(y.shape).astype("float32")
    dx = numpy.full(shape, numpy.nan, "float32")
    call(lib, "max_pool_backward", 2, 32, dy, arg, dx, *geometry)
    numpy.testing.assert_allclose(dx, REFERENCE.max_pool_backward(dy, want_arg, shape, kernel, stride))


@pytest.mark.parametrize("rows, classes", [(3, 2), (4, 300), (2, 5000)])
def test_softmax_xent(lib, rows, classes):
    logits = (rng().standard_normal((rows, classes)) * 8).astype("float32")
    logits[0, 0] = 80.0  # exp would overflow without the running maximum
    labels = rng(1).integers(0, classes, rows).astype("int64")
    grad, loss = numpy.zeros_like(logits), numpy.zeros(rows, "float32")
    call(lib, "softmax_xent", rows, logits, labels, grad, loss, classes, 1.0 / rows)
    want_loss, want_grad = REFERENCE.softmax_cross_entropy(logits, labels)
    numpy.testing.assert_allclose(loss.mean(), want_loss, rtol=1e-5)
    numpy.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_lstm_cell_and_backward(lib):
    batch, hidden = 3, 37
    r = rng(2)
    xg, hg = (r.standard_normal((batch, 4 * hidden)).astype("float32") for _ in range(2))
    c_prev = r.standard_normal((batch, hidden)).astype("float32")
    want = [numpy.zeros((batch, 4 * hidden), "float32")] + [numpy.zeros((batch, hidden), "float32") for _ in range(3)]
    REFERENCE.lstm_cell(xg, hg, c_prev, *want)
    got = [numpy.full_like(a, numpy.nan) for a in want]
    call(lib, "lstm_cell", 2, xg, hg, c_prev, *got, batch, hidden)
    for g, w in zip(got, want):
        numpy.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    acts, _, _, tanh_c = want
    dh = r.standard_normal((batch, hidden)).astype("float32")
    dc = r.standard_normal((batch, hidden)).astype("float32")
    want_dc, want_dgates = dc.copy(), numpy.zeros_like(acts)
    REFERENCE.lstm_cell_backward(dh, want_dc, acts, c_prev, tanh_c, want_dgates)
    got_dc, got_dgates = dc.copy(), numpy.full_like(acts, numpy.nan)
    call(lib, "lstm_cell_backward", 2, dh, got_dc, acts, c_prev, tanh_c, got_dgates, batch, hidden)
    numpy.testing.assert_allclose(got_dgates, want_dgates, rtol=1e-5, atol=1e-6)
    numpy.testing.assert_allclose(got_dc, want_dc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [5, 300])
def test_attention_softmax_and_backward(lib, causal, length):
    shape = (2, 2, length, length) if length < 10 else (1, 1, length, length)  # rows > 256 wide, few blocks
    scores = (rng().standard_normal(shape) * 4).astype("float32")
    blocks = shape[0] * shape[1] * length
    want = REFERENCE.attention_softmax(scores.copy(), 0.125, causal)
    got = scores.copy()
    call(lib, "attention_softmax", blocks, got, length, 0.125, int(causal))
    numpy.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    dprobs = rng(1).standard_normal(scores.shape).astype("float32")
    want_d = REFERENCE.attention_softmax_backward(want, dprobs.copy(), 0.125)
    got_d = dprobs.copy()
    call(lib, "attention_softmax_backward", blocks, want, got_d, length, 0.125)
    numpy.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("width", [7, 600])
def test_layer_norm_and_backward(lib, affine, width):
    r = rng(4)
    x = (r.standard_normal((5, width)) * 3 + 1).astype("float32")
    w, b = r.standard_normal(width).astype("float32"), r.standard_normal(width).astype("float32")
    want_y, want_xhat, want_rstd = REFERENCE.layer_norm(x, w if affine else None, b if affine else None, 1e-5)
    y, xhat, rstd = numpy.zeros_like(x), numpy.zeros_like(x), numpy.zeros(5, "float32")
    call(lib, "layer_norm", 5, x, w, b, y, xhat, rstd, width, 1e-5, int(affine))
    numpy.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
    numpy.testing.assert_allclose(rstd, want_rstd[:, 0], rtol=1e-5)
    dy = r.standard_normal(x.shape).astype("float32")
    want_dx = REFERENCE.layer_norm_backward(dy, want_xhat, want_rstd, w if affine else None)[0]
    dx = numpy.zeros_like(x)
    call(lib, "layer_norm_backward", 5, dy, xhat, rstd, w, dx, width, int(affine))
    numpy.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [a for a in ACTIVATION_CODES if a])
def test_activation_forward_and_backward(lib, activation):
    x, dy = (rng(i).standard_normal(1001).astype("float32") * 3 for i in range(2))
    y = numpy.full_like(x, numpy.nan)
    call(lib, "activation_forward", 3, x, y, numpy.int64(x.size), ACTIVATION_CODES[activation])
    numpy.testing.assert_allclose(y, REFERENCE.activation(activation, x), rtol=1e-5, atol=1e-6)
    dx = numpy.full_like(x, numpy.nan)
    call(lib, "activation_backward", 3, x, y, dy, dx, numpy.int64(x.size), ACTIVATION_CODES[activation])
    numpy.testing.assert_allclose(dx, REFERENCE.activation_backward(activation, x, y, dy), rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("momentum, nesterov, decay, first", [(0.0, False, 0.0, True), (0.9, True, 0.01, False),
                                                              (0.9, False, 0.0, True)])
def test_sgd_update(lib, momentum, nesterov, decay, first):
    r = rng(3)
    param, grad, velocity = (r.standard_normal(777).astype("float32") for _ in range(3))
    want_p, want_v = param.copy(), velocity.copy()
    REFERENCE.sgd_update(want_p, grad, want_v, 0.1, momentum, 0.0, decay, nesterov, first)
    call(lib, "sgd_update", 2, param, grad, velocity, numpy.int64(param.size), 0.1, momentum, 0.0, decay, int(nesterov),
         int(first))
    numpy.testing.assert_allclose(param, want_p, rtol=1e-6, atol=1e-7)
    if momentum:
        numpy.testing.assert_allclose(velocity, want_v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("decoupled, decay", [(False, 0.0), (False, 0.1), (True, 0.1)])
def test_adam_update(lib, decoupled, decay):
    r = rng(4)
    param, grad, m = (r.standard_normal(777).astype("float32") for _ in range(3))
    v = numpy.abs(r.standard_normal(777)).astype("float32")
    want = [a.copy() for a in (param, m, v)]
    REFERENCE.adam_update(want[0], grad, want[1], want[2], 1e-2, 0.9, 0.999, 1e-8, decay, decoupled, 3)
    call(lib, "adam_update", 2, param, grad, m, v, numpy.int64(param.size), 1e-2, 0.9, 0.999, 1e-8, decay,
         int(decoupled), float(1 - 0.9**3), float((1 - 0.999**3) ** 0.5))
    for got, expected in zip((param, m, v), want):
        numpy.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
