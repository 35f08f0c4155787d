"""The CPU backend's own Numba kernels against independent float64 references (NumPy in float64).

Each kernel is NumpyOps' fast path of an op whose device-parametrised test compares CPU and GPU
with the float32 base implementation; here the shapes and values aim at the kernels' own edges
(odd sizes, rows split across threads, extreme logits, NaN) and the reference is exact math.
"""
from __future__ import annotations

import numpy
import pytest

from gpunet.backend.numpy_ops import NumpyOps
from gpunet.backend.ops import Ops
from tests.support.arrays import rng
from tests.support.tolerance import (ULPS, U, assert_within, conv_atol, conv_backward_atol, path_atol, softmax_atol,
                                     softmax_backward_atol, ulps, xent_atol, xent_grad_atol)

OPS = NumpyOps()
ERF_ABS = 4e-7  # NumpyOps' float32 erf is within this of math.erf (tests/backend/test_ops.py checks it)


def xent64(logits, labels):
    x = logits.astype(numpy.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    total = numpy.exp(shifted).sum(axis=1)
    rows = numpy.arange(len(x))
    grad = numpy.exp(shifted) / total[:, None]
    grad[rows, labels] -= 1.0
    return (numpy.log(total) - shifted[rows, labels]).mean(), grad / len(x)


@pytest.mark.parametrize("rows, classes, scale", [(1, 1, 1.0), (3, 2, 1.0), (7, 33, 30.0), (129, 1000, 5.0),
                                                  (2, 65_537, 1.0), (4096, 10, 100.0)])
def test_softmax_cross_entropy_matches_float64(rows, classes, scale):
    logits = (rng(rows).standard_normal((rows, classes)) * scale).astype("float32")
    labels = rng(classes).integers(0, classes, rows)
    loss, grad = OPS.softmax_cross_entropy(logits, labels)
    want_loss, want_grad = xent64(logits, labels)
    assert loss.dtype == numpy.float32 and grad.dtype == numpy.float32 and grad.shape == logits.shape
    assert_within(loss, want_loss, xent_atol(logits, labels), "loss")
    assert_within(grad, want_grad, xent_grad_atol(logits, want_grad), "gradient")


def test_softmax_cross_entropy_far_below_the_maximum_and_nan():
    logits = numpy.array([[0.0, -80.0, -90.0, -1e30], [1.0, numpy.nan, 0.0, 2.0], [numpy.inf, 0.0, 1.0, 2.0]],
                         dtype="float32")
    loss, grad = OPS.softmax_cross_entropy(logits[:1], numpy.array([1]))
    want_loss, want_grad = xent64(logits[:1], numpy.array([1]))
    assert_within(loss, want_loss, xent_atol(logits[:1], [1]), "loss")
    assert_within(grad, want_grad, xent_grad_atol(logits[:1], want_grad), "gradient")  # e^-90 flushes to 0
    masked = numpy.array([[0.5, -numpy.inf, 2.0, -numpy.inf]], dtype="float32")  # -inf masks a class, as in torch
    loss, grad = OPS.softmax_cross_entropy(masked, numpy.array([2]))
    want_loss, want_grad = xent64(masked, numpy.array([2]))
    assert_within(loss, want_loss, xent_atol(masked, [2]), "masked loss")
    assert_within(grad, want_grad, xent_grad_atol(masked, want_grad), "masked gradient")
    for row in (1, 2):  # a NaN or +inf logit makes the loss NaN, as in torch
        loss, _ = OPS.softmax_cross_entropy(logits[row:row + 1], numpy.array([0]))
        assert numpy.isnan(loss)


def test_softmax_cross_entropy_float64_and_strided_inputs_take_the_numpy_path():
    logits = rng().standard_normal((40, 9))
    labels = rng(1).integers(0, 9, 40)
    for x in (logits, logits.astype("float32")[::2]):
        loss, grad = OPS.softmax_cross_entropy(x, labels[: len(x)])
        want_loss, want_grad = xent64(x, labels[: len(x)])
        assert grad.dtype == x.dtype
        # float64 input: its own unit roundoff, far inside the float32 bound used for both
        assert_within(loss, want_loss, xent_atol(x, labels[: len(x)]), f"loss {x.dtype}")
        assert_within(grad, want_grad, xent_grad_atol(x, want_grad), f"gradient {x.dtype}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape, out_c, kernel, padding, pool, bias, stride", [
    ((3, 2, 9, 9), 4, (3, 3), (0, 0), (2, 2), True, (1, 1)),  # 7x7 conv output: the last row and column pool nowhere
    ((2, 1, 8, 6), 3, (2, 3), (1, 0), (3, 2), False, (1, 1)), ((5, 3, 6, 6), 1, (1, 1), (0, 0), (1, 1), True, (1, 1)),
    ((2, 2, 11, 9), 3, (3, 3), (1, 1), (2, 2), True, (2, 2)),  # strided: the columns of im2col, not wide rows
    ((2, 3, 13, 12), 2, (3, 2), (0, 1), (3, 2), False, (2, 1))])
def test_conv_relu_pool_and_backward_match_float64(dtype, shape, out_c, kernel, padding, pool, bias, stride):
    r = rng(out_c)  # values exact in float32: the reference sees what the kernel sees
    x = r.standard_normal(shape).astype("float32").astype("float64")
    w = r.standard_normal((out_c, shape[1], *kernel)).astype("float32").astype("float64")
    b = r.standard_normal(out_c).astype("float32").astype("float64") if bias else None
    reference = Ops()  # the base class's layer-by-layer NumPy ops, here in float64
    want_y, want_cols = reference.conv2d(x, w, b, stride, padding, "relu")
    want_p, want_arg = reference.max_pool(want_y, pool, pool)
    pooled, arg, cols, y_shape = OPS.conv2d_relu_pool(*(a if a is None else a.astype(dtype) for a in (x, w, b)),
                                                      stride, padding, pool)
    assert y_shape == want_y.shape and pooled.dtype == dtype
    # the conv is a GEMM of inner length C kh kw (plus the bias); ReLU and the max move no error up
    y_atol = conv_atol(x, w, stride, padding) + (numpy.abs(b).reshape(-1, 1, 1) if bias else 0) * 2 * U
    # the bounds in the dtype's unit roundoff: float64's is 2^-29 of float32's
    scaled = lambda bound: bound * (1.0 if dtype == "float32" else 2.0**-29)  # noqa: E731
    assert_within(pooled, want_p, scaled(reference.max_pool(y_atol, pool, pool)[0]), "pooled")
    dp = r.standard_normal(want_p.shape).astype("float32").astype("float64")
    gw, gb = numpy.empty(w.shape, dtype), numpy.empty(out_c, dtype) if bias else None
    dx = OPS.conv2d_relu_pool_backward(dp.astype(dtype), pooled, arg, cols, x.shape, y_shape, w.astype(dtype), gw, gb,
                                       stride, padding, pool)
    want_gw, want_gb = numpy.empty(w.shape), numpy.empty(out_c) if bias else None
    dy = reference.max_pool_backward(dp, want_arg, want_y.shape, pool, pool)
    want_dx = reference.conv2d_backward(dy, want_cols, x.shape, w, want_gw, want_gb, stride, padding,
                                        activation="relu", y=want_y)
    bounds = conv_backward_atol(x, w, dy, stride, padding)
    for name, got, want, bound in zip(("dx", "dW", "db"), (dx, gw, gb), (want_dx, want_gw, want_gb), bounds):
        if want is not None:
            assert_within(got, want, scaled(bound), name)


def conv_round_trip(x, w, b, pool):
    """A stride-1 Conv2D forward and backward (with ReLU, or ReLU and max pool): what callers keep."""
    gw, gb = numpy.empty_like(w), numpy.empty_like(b)
    if pool:
        pooled, arg, cols, y_shape = OPS.conv2d_relu_pool(x, w, b, (1, 1), (1, 1), (2, 2))
        dx = OPS.conv2d_relu_pool_backward(numpy.ones_like(pooled), pooled, arg, cols, x.shape, y_shape, w, gw, gb,
                                           (1, 1), (1, 1), (2, 2))
        return pooled, cols, dx, gw, gb
    y, cols = OPS.conv2d(x, w, b, (1, 1), (1, 1), "relu")
    dx = OPS.conv2d_backward(numpy.ones_like(y), cols, x.shape, w, gw, gb, (1, 1), (1, 1), True, "relu", y)
    return y, cols, dx, gw, gb


@pytest.mark.parametrize("pool", [False, True])
def test_conv_work_arrays_never_reach_the_caller(pool, monkeypatch):
    """The CPU convolutions reuse their work arrays from call to call: nothing they return may be
    one of them (a later call on a larger input would change it), and the numbers are those of
    fresh arrays."""
    from gpunet.backend import numpy_ops
    r = rng(11)
    w, b = r.standard_normal((4, 3, 3, 3)).astype("float32"), r.standard_normal(4).astype("float32")
    x = r.standard_normal((2, 3, 8, 8)).astype("float32")
    first = conv_round_trip(x, w, b, pool)
    kept = [a.copy() for a in first]
    for shape in ((2, 3, 8, 8), (1, 3, 5, 6), (5, 3, 12, 10)):  # the same arrays again, a part of them, larger ones
        conv_round_trip(r.standard_normal(shape).astype("float32"), w, b, pool)
    for got, want in zip(first, kept):
        numpy.testing.assert_array_equal(got, want)
    monkeypatch.setattr(numpy_ops, "SCRATCH_KEPT_BYTES", 0)  # every work array fresh
    for got, want in zip(conv_round_trip(x, w, b, pool), kept):
        numpy.testing.assert_array_equal(got, want)


def test_gelu_and_its_derivative_match_float64():
    import math
    x = numpy.concatenate([numpy.linspace(-20, 20, 40_001), [0.0, -1e-30, 1e30, -1e30]]).astype("float32")
    dy = rng().standard_normal(x.shape).astype("float32")
    x64 = x.astype("float64")
    cdf = 0.5 * (1 + numpy.array([math.erf(v / math.sqrt(2)) for v in x64]))
    pdf = numpy.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
    y = OPS.activation("gelu", x)
    assert y.dtype == numpy.float32
    # 0.5 x (1 + erf(x / sqrt 2)): the fast erf within ERF_ABS (test_ops' erf test), 4 roundings of 0.5|x|(1 + |erf|)
    erf = 2 * cdf - 1
    assert_within(y, x64 * cdf, 0.5 * numpy.abs(x64) * (ERF_ABS + 4 * 2 * U * (1 + numpy.abs(erf))) + ulps(y, 1),
                  "gelu")
    out = numpy.empty_like(x)
    assert OPS.activation("gelu", x, out=out) is out and numpy.array_equal(out, y)
    # dy (cdf + x pdf): cdf within ERF_ABS / 2, exp within ULPS, 6 roundings of the terms
    want = dy * (cdf + x64 * pdf)
    assert_within(OPS.activation_backward("gelu", x, y, dy), want,
                  numpy.abs(dy) * (ERF_ABS / 2 + (ULPS + 6) * 2 * U * (cdf + numpy.abs(x64) * pdf)) + ulps(want, 1),
                  "gelu backward")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape, affine, residual", [((3, 5, 7), True, False), ((1, 1), False, True),
                                                     ((64, 257), True, True), ((2, 3, 4, 1000), False, False)])
def test_layer_norm_and_backward_match_float64(dtype, shape, affine, residual):
    r = rng(shape[-1])
    exact = lambda a: a.astype("float32").astype("float64")  # noqa: E731  (the reference sees the kernel's inputs)
    x = exact(r.standard_normal(shape) * 3 + 1)
    w, b = (exact(r.standard_normal(shape[-1])), exact(r.standard_normal(shape[-1]))) if affine else (None, None)
    dy, res = exact(r.standard_normal(shape)), exact(r.standard_normal(shape)) if residual else None
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    y, xhat, rstd = OPS.layer_norm(cast(x), cast(w), cast(b), 1e-5)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    want_xhat = (x - mean) / numpy.sqrt(var + 1e-5)
    want_y = want_xhat * w + b if affine else want_xhat
    # the sums as gpunet.parity_bound counts LayerNorm's, in the dtype's unit roundoff (float64's is 2^-29 of float32's)
    length, unit = 4 * shape[-1] + x.size // shape[-1], 1.0 if dtype == "float32" else 2.0**-29
    within = lambda got, want, what: assert_within(got, want, unit * path_atol(want, length), what)  # noqa: E731
    assert y.dtype == dtype and rstd.shape == (*shape[:-1], 1)
    for got, want, what in ((y, want_y, "y"), (xhat, want_xhat, "xhat"), (rstd, 1 / numpy.sqrt(var + 1e-5), "rstd")):
        within(got, want, what)
    gw, gb = (numpy.empty(shape[-1], dtype), numpy.empty(shape[-1], dtype)) if affine else (None, None)
    dx, dw, db = OPS.layer_norm_backward(cast(dy), xhat, rstd, cast(w), gw, gb, cast(res))
    g = dy * w if affine else dy
    d = shape[-1]
    want_dx = (g - g.mean(-1, keepdims=True) - want_xhat * (g * want_xhat).sum(-1, keepdims=True) / d) / numpy.sqrt(
        var + 1e-5) + (res if residual else 0)
    within(dx, want_dx, "dx")
    if affine:
        axes = tuple(range(len(shape) - 1))
        assert dw is gw and db is gb
        within(dw, (dy * want_xhat).sum(axes), "dw")
        within(db, dy.sum(axes), "db")


@pytest.mark.parametrize("shape, causal", [((1, 1, 1), True), ((3, 5, 5), True), ((2, 3, 33, 33), False),
                                           ((4, 128, 128), True)])
def test_attention_softmax_and_backward_match_float64(shape, causal):
    r = rng(shape[-1])
    scores, dprobs = r.standard_normal(shape) * 4, r.standard_normal(shape)
    scale = 0.3
    z = scores * scale
    if causal:
        z = numpy.where(numpy.tril(numpy.ones(shape[-2:], bool)), z, -numpy.inf)
    want = numpy.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    probs = OPS.attention_softmax(scores.astype("float32"), scale, causal)
    p_atol = softmax_atol(z)  # its spread term covers the scores' rounding to float32 too
    assert_within(probs, want, p_atol, "attention_softmax")
    if causal:
        assert not probs[..., numpy.triu(numpy.ones(shape[-2:], bool), 1)].any()  # exact zeros
    want_d = want * (dprobs - (dprobs * want).sum(-1, keepdims=True)) * scale
    got_d = OPS.attention_softmax_backward(probs, dprobs.astype("float32"), scale)
    # the kernel's own probs differ by p_atol: through scale (dp - s) and through the sum s
    carried = scale * (p_atol * numpy.abs(dprobs - (dprobs * want).sum(-1, keepdims=True))
                       + want * (numpy.abs(dprobs) * p_atol).sum(-1, keepdims=True))
    assert_within(got_d, want_d, softmax_backward_atol(want, dprobs, scale) + carried, "attention_softmax_backward")
