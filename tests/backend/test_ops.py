"""Every hot op of every backend against the reference Ops (the xp code on NumPy), from one
test definition: on "cpu" that checks NumpyOps' Numba kernels, on "gpu" CupyOps' CUDA kernels.
Shapes are odd and large enough to need many thread blocks; some inputs are non-contiguous."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy
import pytest

import gpunet as gn
from gpunet.backend import cuda_kernels, ops_for_device
from gpunet.backend.ops import Ops
from tests.support.arrays import on, rng
from tests.support.tolerance import (activation_grad_atol, assert_within, elementwise_atol, gamma, linear_atol,
                                     linear_backward_atol, path_atol, softmax_atol, softmax_backward_atol, xent_atol,
                                     xent_grad_atol)

REFERENCE = Ops()
KERNELS = sorted((Path(__file__).parents[2] / "kernels").glob("*.cu"))


def close(got, want, rtol=1e-5, atol=1e-6):
    numpy.testing.assert_allclose(gn.to_numpy(got), want, rtol=rtol, atol=atol)


def check_linear(ops, device, x, w, b, dy, activation):
    """ops.linear and its backward against the reference Ops, within the bounds of
    tests/support/tolerance.py (the GEMMs' inner lengths, the activation's ulps)."""
    assert_within(gn.to_numpy(ops.linear(on(device, x), on(device, w), on(device, b), activation)),
                  REFERENCE.linear(x, w, b, activation), linear_atol(x, w, b, activation), "linear")
    z = REFERENCE.linear(x, w, b)
    y = REFERENCE.activation(activation, z) if activation else z
    n, k = w.shape
    grads = [numpy.zeros((n, k), "float32"), numpy.zeros(n, "float32") if b is not None else None]
    want_dx = REFERENCE.linear_act_backward(x, w, z, y, dy, activation, *grads)
    got = [None if g is None else on(device, g) for g in grads]
    got_dx = ops.linear_act_backward(*(on(device, a) for a in (x, w, z, y, dy)), activation, *got)
    dz = REFERENCE.activation_backward(activation, z, y, dy) if activation else dy
    bounds = linear_backward_atol(x, w, dz, activation_grad_atol(dy, activation))
    for name, g, want, bound in zip(("dx", "dW", "db"), (got_dx, *got), (want_dx, *grads), bounds):
        if want is not None:
            assert_within(gn.to_numpy(g), want, bound, name)


@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (130, 77, 203), (257, 300, 65)], ids=lambda s: "x".join(map(str, s)))
def test_linear_and_its_backward(device, activation, shape):
    m, k, n = shape
    r = rng(m + n)
    x, w, b, dy = (r.standard_normal(s).astype("float32") for s in ((m, k), (n, k), (n,), (m, n)))
    check_linear(ops_for_device(device), device, x, w, b, dy, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fused", "cublas", "cublaslt"])
def test_every_gemm_path_with_an_epilogue(monkeypatch, mode):
    """The dispatch picks one path per size class by timing; this runs each on purpose (cuBLASLt's
    takes a bias with or without ReLU; GELU falls back to the fused kernel)."""
    ops = ops_for_device("gpu")
    monkeypatch.setattr(ops, "gemm_mode", mode)
    x, w, b = (rng(i).standard_normal(s).astype("float32") for i, s in enumerate(((300, 130), (200, 130), (200,))))
    for activation in (None, "relu", "gelu"):
        assert_within(gn.to_numpy(ops.linear(on("gpu", x), on("gpu", w), on("gpu", b), activation)),
                      REFERENCE.linear(x, w, b, activation), linear_atol(x, w, b, activation), f"{mode} {activation}")


GEOMETRIES = [((2, 3, 9, 11), (3, 3), (1, 1), (1, 1)), ((5, 4, 28, 28), (5, 5), (2, 2), (2, 2)),
              ((1, 2, 7, 6), (2, 3), (3, 2), (0, 1)), ((64, 6, 14, 14), (5, 5), (1, 1), (0, 0))]


@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES)
def test_im2col_and_col2im(device, shape, kernel, stride, padding):
    x = rng().standard_normal(shape).astype("float32")
    ops = ops_for_device(device)
    cols = ops.im2col(on(device, x), kernel, stride, padding)
    want = REFERENCE.im2col(x, kernel, stride, padding)
    close(cols, want, rtol=0, atol=0)
    dcols = rng(1).standard_normal(want.shape).astype("float32")
    want_dx = REFERENCE.col2im(dcols, shape, kernel, stride, padding)  # each pixel a sum of at most kh*kw taps
    taps = kernel[0] * kernel[1]
    assert_within(gn.to_numpy(ops.col2im(on(device, dcols), shape, kernel, stride, padding)), want_dx,
                  2 * gamma(taps) * REFERENCE.col2im(numpy.abs(dcols), shape, kernel, stride, padding),
                  "col2im")


@pytest.mark.parametrize("shape, kernel, stride", [((2, 3, 8, 8), (2, 2), (2, 2)), ((3, 5, 13, 11), (3, 3), (2, 2)),
                                                   ((1, 1, 7, 7), (3, 2), (1, 3))])
def test_max_pool_and_backward(device, shape, kernel, stride):
    x = rng().standard_normal(shape).astype("float32")
    ops = ops_for_device(device)
    y, argmax = ops.max_pool(on(device, x), kernel, stride)
    want_y, want_arg = REFERENCE.max_pool(x, kernel, stride)
    close(y, want_y, rtol=0, atol=0)
    numpy.testing.assert_array_equal(gn.to_numpy(argmax).reshape(-1), want_arg.reshape(-1))  # layouts differ
    dy = rng(1).standard_normal(want_y.shape).astype("float32")
    taps = kernel[0] * kernel[1]  # a pixel is the maximum of at most this many windows: a sum of their dy
    assert_within(gn.to_numpy(ops.max_pool_backward(on(device, dy), argmax, shape, kernel, stride)),
                  REFERENCE.max_pool_backward(dy, want_arg, shape, kernel, stride),
                  2 * gamma(taps) * REFERENCE.max_pool_backward(numpy.abs(dy), want_arg, shape, kernel, stride),
                  "max_pool_backward")


@pytest.mark.parametrize("rows, classes", [(3, 2), (257, 1000), (2, 100_003)])
def test_softmax_cross_entropy(device, rows, classes):
    logits = (rng().standard_normal((rows, classes)) * 5).astype("float32")
    labels = rng(1).integers(0, classes, rows)
    loss, grad = ops_for_device(device).softmax_cross_entropy(on(device, logits), on(device, labels))
    check_xent(loss, grad, logits, labels)


def check_xent(loss, grad, logits, labels):
    """A softmax cross-entropy's mean loss and gradient against the reference Ops's, within the bounds of
    tests/support/tolerance.py (the sums over the classes and the rows)."""
    want_loss, want_grad = REFERENCE.softmax_cross_entropy(logits, labels)
    assert_within(gn.to_numpy(loss), want_loss, xent_atol(logits, labels), "loss")
    assert_within(gn.to_numpy(grad), want_grad, xent_grad_atol(logits, want_grad), "gradient")


def test_non_contiguous_inputs(device):
    x = rng().standard_normal((40, 33)).astype("float32")
    w = rng(1).standard_normal((33, 21)).astype("float32")  # used transposed: a non-contiguous weight
    ops = ops_for_device(device)
    assert_within(gn.to_numpy(ops.linear(on(device, x)[:, :], on(device, w).T, None, "relu")),
                  REFERENCE.linear(x, w.T, None, "relu"), linear_atol(x, w.T, None, "relu"), "linear")
    logits = rng(2).standard_normal((33, 40)).astype("float32")
    labels = rng(3).integers(0, 33, 40)
    loss, grad = ops.softmax_cross_entropy(on(device, logits).T, on(device, labels))
    check_xent(loss, grad, numpy.ascontiguousarray(logits.T), labels)


def test_embedding_backward_adds_repeated_ids(device):
    ids = rng().integers(0, 7, (9, 13))
    dy = rng(1).standard_normal((9, 13, 5)).astype("float32")
    want = numpy.zeros((7, 5), "float32")
    REFERENCE.embedding_backward(ids, dy, want)
    got = on(device, numpy.full((7, 5), 3.0, "float32"))
    ops_for_device(device).embedding_backward(on(device, ids), on(device, dy), got)
    count = numpy.bincount(ids.ravel(), minlength=7).max()  # each row a sum of at most this many dy rows
    abs_sum = numpy.zeros((7, 5))
    numpy.add.at(abs_sum, ids.ravel(), numpy.abs(dy.reshape(-1, 5)))
    assert_within(gn.to_numpy(got), want, 2 * gamma(count) * abs_sum, "embedding gradient")


@pytest.mark.parametrize("batch, hidden", [(1, 1), (32, 256), (5, 300)])
def test_lstm_cell_and_backward(device, batch, hidden):
    r = rng(hidden)
    xg, hg = (r.standard_normal((batch, 4 * hidden)).astype("float32") for _ in range(2))
    c_prev, dh, dc = (r.standard_normal((batch, hidden)).astype("float32") for _ in range(3))
    want = [numpy.zeros((batch, 4 * hidden), "float32")] + [numpy.zeros((batch, hidden), "float32") for _ in range(3)]
    REFERENCE.lstm_cell(xg, hg, c_prev, *want)
    ops = ops_for_device(device)
    got = [on(device, numpy.zeros_like(a)) for a in want]
    ops.lstm_cell(on(device, xg), on(device, hg), on(device, c_prev), *got)
    forward_atol, backward_atol = lstm_cell_atols(c_prev, dh, dc)
    for g, w, name in zip(got, want, ("gates", "c", "h", "tanh(c)")):
        assert_within(gn.to_numpy(g), w, forward_atol if g.shape == c_prev.shape else numpy.tile(forward_atol, 4), name)
    acts, _, _, tanh_c = want
    want_dc, want_dgates = dc.copy(), numpy.zeros_like(acts)
    REFERENCE.lstm_cell_backward(dh, want_dc, acts, c_prev, tanh_c, want_dgates)
    got_dc, got_dgates = on(device, dc), on(device, numpy.zeros_like(acts))
    ops.lstm_cell_backward(on(device, dh), got_dc, on(device, acts), on(device, c_prev), on(device, tanh_c), got_dgates)
    assert_within(gn.to_numpy(got_dgates), want_dgates, numpy.tile(backward_atol, 4), "dgates")
    assert_within(gn.to_numpy(got_dc), want_dc, backward_atol, "dc")


def lstm_cell_atols(c_prev, dh, dc):
    """The LSTM cell is elementwise: gates sigma/tanh(xg + hg), c = f c_prev + i g, h = o tanh(c),
    each output within 10 roundings and 4 functions of terms of size |c_prev| + 2 (gates <= 1);
    the backward's dc and dgates within 10 roundings of (|dh| + |dc|)(|c_prev| + 2)."""
    c_prev = numpy.abs(c_prev.astype("float64"))
    return (elementwise_atol(c_prev + 2, 10, 4),
            elementwise_atol((numpy.abs(dh) + numpy.abs(dc)) * (c_prev + 2), 10))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 4, 130, 130), (2, 1, 300, 300)], ids=lambda s: "x".join(map(str, s)))
def test_attention_softmax_and_backward(device, shape, causal):
    scores = (rng().standard_normal(shape) * 4).astype("float32")
    ops = ops_for_device(device)
    want = REFERENCE.attention_softmax(scores.copy(), 0.125, causal)
    probs = ops.attention_softmax(on(device, scores.copy()), 0.125, causal)
    z = scores.astype("float64") * 0.125
    if causal:
        z = numpy.where(numpy.tril(numpy.ones(shape[-2:], bool)), z, -numpy.inf)
    assert_within(gn.to_numpy(probs), want, softmax_atol(z), "attention_softmax")
    dprobs = rng(1).standard_normal(shape).astype("float32")
    expected = REFERENCE.attention_softmax_backward(want, dprobs.copy(), 0.125)  # both work in place
    assert_within(gn.to_numpy(ops.attention_softmax_backward(on(device, want), on(device, dprobs.copy()), 0.125)),
                  expected, softmax_backward_atol(want, dprobs, 0.125), "attention_softmax_backward")


def _einsum_attention(qkv, dmixed, causal):
    """Attention and its backward written out in float64 einsums: (mixed, dqkv)."""
    q, k, v = (qkv[:, :, i].astype("float64") for i in range(3))  # each (B, T, H, Dh)
    t, scale = qkv.shape[1], 1.0 / numpy.sqrt(qkv.shape[-1])
    scores = numpy.einsum("bthd,bshd->bhts", q, k) * scale
    if causal:
        scores[..., numpy.triu(numpy.ones((t, t), dtype=bool), 1)] = -numpy.inf
    probs = numpy.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    dprobs = numpy.einsum("bthd,bshd->bhts", dmixed, v)
    dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) * scale
    dq, dk = numpy.einsum("bhts,bshd->bthd", dscores, k), numpy.einsum("bhts,bthd->bshd", dscores, q)
    dv = numpy.einsum("bhts,bthd->bshd", probs, dmixed)
    return numpy.einsum("bhts,bshd->bthd", probs, v), numpy.stack([dq, dk, dv], axis=2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])  # float64: each backend's xp code (strided matmuls)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_and_backward_match_an_einsum_reference(device, dtype, causal):
    qkv = rng(3).standard_normal((2, 7, 3, 3, 4)).astype(dtype)
    dmixed = rng(4).standard_normal((2, 7, 3, 4)).astype(dtype)
    want, want_dqkv = _einsum_attention(qkv, dmixed, causal)
    ops = ops_for_device(device)
    mixed, state = ops.attention(on(device, qkv), causal)
    dqkv = ops.attention_backward(on(device, dmixed), state)
    if dtype == "float64":  # float64's roundoff (1e-16) times these sums' lengths: far inside 1e-10
        close(mixed, want, rtol=1e-10, atol=1e-12)
        close(dqkv, want_dqkv, rtol=1e-10, atol=1e-12)
        return
    # the sums along the way: scores over Dh, the softmax's over T, the mix over T; back: Dh, T, T, T
    length = 2 * qkv.shape[-1] + 5 * qkv.shape[1]
    assert_within(gn.to_numpy(mixed), want, path_atol(want, length), "attention")
    assert_within(gn.to_numpy(dqkv), want_dqkv, path_atol(want_dqkv, length), "attention_backward")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(3, 1), (4, 9, 256), (2, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_and_backward(device, shape, affine):
    r = rng(5)
    x = (r.standard_normal(shape) * 3 + 1).astype("float32")
    w, b, dy = r.standard_normal(shape[-1]).astype("float32"), r.standard_normal(shape[-1]).astype("float32"), \
        r.standard_normal(shape).astype("float32")
    w, b = (w, b) if affine else (None, None)
    ops = ops_for_device(device)
    y, xhat, rstd = ops.layer_norm(on(device, x), on(device, w) if affine else None, on(device, b) if affine else None,
                                   1e-5)
    want_y, want_xhat, want_rstd = REFERENCE.layer_norm(x, w, b, 1e-5)
    length = 4 * shape[-1] + x.size // shape[-1]  # as gpunet.parity_bound counts LayerNorm's sums
    assert_within(gn.to_numpy(y), want_y, path_atol(want_y, length), "layer_norm")
    got = ops.layer_norm_backward(on(device, dy), xhat, rstd, on(device, w) if affine else None)
    want = REFERENCE.layer_norm_backward(dy, want_xhat, want_rstd, w)
    for g, wnt, name in zip(got, want, ("dx", "dw", "db")):
        if wnt is None:
            assert g is None
        else:
            assert_within(gn.to_numpy(g), wnt, path_atol(wnt, length), name)


def test_fast_float32_erf_is_within_4e_7_of_math_erf():
    import math
    x = numpy.linspace(-6, 6, 20001).astype("float32")
    want = numpy.array([math.erf(float(v)) for v in x])
    assert numpy.abs(ops_for_device("cpu").erf(x) - want).max() < 4e-7


@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
@pytest.mark.parametrize("flags", [cuda_kernels.DEFINE_FLAGS, ()], ids=["gpunet's flags", "alone"])
def test_kernel_source_compiles_for_sm_90(source, flags, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on this machine")
    result = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", *flags, "-c", str(source), "-o",
                             str(tmp_path / "k.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def nvrtc_compile(source: Path, options: tuple[str, ...]) -> tuple[bool, str]:
    from tests.support import nvrtc
    if nvrtc.library() is None:
        pytest.skip("libnvrtc is not on this machine (pip install nvidia-cuda-nvrtc, part of the test extra)")
    return nvrtc.compile_source(source.read_text(), source.name, options=(*options, "--gpu-architecture=sm_90"))


@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_kernel_source_compiles_with_nvrtc_as_cupy_would(source):
    compiled, log = nvrtc_compile(source, cuda_kernels.NVRTC_OPTIONS)  # the options CupyOps hands RawModule
    assert compiled, log


@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_a_kernel_source_compiles_alone_with_nvrtc(source):
    """Without gpunet's -D flags each source compiles on its own fallbacks (equal to Python's values:
    tests/kernels/test_resources.py), so `nvcc kernels/FILE.cu` works for anyone reading a kernel."""
    compiled, log = nvrtc_compile(source, ("--std=c++17",))
    assert compiled, log


def test_every_kernel_family_is_there():
    assert [p.stem for p in KERNELS] == ["attention", "batch_norm", "embedding", "gemm", "gemm16", "im2col", "optim",
                                         "precision", "random", "sequence", "softmax_xent"]


@pytest.mark.parametrize("shape, residual", [((7,), False), ((9, 130), True), ((2, 3, 65), False)])
def test_dropout_and_its_backward(device, shape, residual):
    """Counter-based masks: the same bits on every device (see also tests/test_random.py)."""
    x, r, dy = (rng(i).standard_normal(shape).astype("float32") for i in range(3))
    stream = (99, 5, 2, 0)
    ops = ops_for_device(device)
    y, mask = ops.dropout(on(device, x), 0.25, stream, on(device, r) if residual else None)
    want, want_mask = REFERENCE.dropout(x, 0.25, stream, r if residual else None)
    numpy.testing.assert_array_equal(gn.to_numpy(y), want)
    numpy.testing.assert_array_equal(gn.to_numpy(ops.dropout_backward(on(device, dy), 0.25, stream, mask)),
                                     dy * (want_mask.astype("float32") * (1 / 0.75)))  # (the kept elements, scaled)
    assert want_mask.dtype == bool  # a byte an element: the CPU keeps the booleans, a GPU regenerates them


# ------------------------------------------------------------------ rows beyond gridDim.y
