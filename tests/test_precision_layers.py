"""Mixed precision in the layers (issue 30, items 1, 3, 4; docs/precision.md): every matrix product rounds
its float32 operands to bf16 or fp16 (to nearest even) and multiplies them in float32, at the same points
on the CPU and the GPU (the stand-in here); activations that only feed products, and ReLU's outputs, are
kept in 16 bits.

(a) The CPU in mixed precision against an independent float64 reference that rounds the operands itself
    (tolerance.round16): within the float32 sums' bound of the rounded operands (matmul16_atol, conv16_atol).
(b) The CPU against the GPU, forward and every gradient. Dense, the convolutions and the fused conv, ReLU
    and max pool: a bound derived elementwise (tolerance.matmul16_atol and its kin: the float32 sums, plus
    one 16-bit ulp of an operand wherever a rounding boundary lies within the fp32 bound of a computed
    operand, dz). The layers with products in a chain (recurrent, attention, the transformer block): both
    backends' rounding points recorded (Ops.gemm_operands): the same points, in the same order, of the same
    shapes; each computed operand within the fp32 path bound of the other side's (plus what earlier
    operands that rounded differently carry); outputs and gradients within tolerance.path16_atol.
(c) fp32 unchanged: precision "fp32" gives the bits the layers give outside any precision context.
(d) The kept activations are 16-bit arrays, and the backward from them is bit for bit the backward from
    float32 arrays holding the same values (on the CPU).

The measured/bound ratios of (a) and (b) are printed as a table at the end of the module (pytest -s).
"""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy
import pytest
import torch

import gpunet as gn
from gpunet import layers as L
from gpunet.backend import ops_for_device, precision
from gpunet.backend.ops import is_16bit
from gpunet.parity_bound import reduction_path
from tests.support.arrays import on, rng
from tests.support.tolerance import (U16, activation_grad16_atol, assert_within, bias_act_atol, conv16_atol,
                                     conv16_backward_atol, gamma, linear16_atol, linear16_backward_atol, path16_atol,
                                     round16, rounded_change, ulps)

KINDS = ["bf16", "fp16"]
RATIOS: dict[tuple, float] = {}  # (case, device, kind, what) -> measured / bound


@pytest.fixture(scope="module", autouse=True)
def _ratio_table():
    yield
    if RATIOS:
        print("\nmixed precision parity, measured / bound (the worst element):")
        for (case, device, kind, what), r in sorted(RATIOS.items()):
            print(f"  {case:22s} {device:4s} {kind:5s} {what:24s} {r:.3g}")


def within(got, want, bound, key) -> None:
    RATIOS[key] = max(RATIOS.get(key, 0.0), assert_within(gn.to_numpy(got), want, bound, " ".join(key)))


def f32(*shape, seed=0, scale=1.0):
    return (rng(seed).standard_normal(shape) * scale).astype("float32")


def run(layer, x, dy, device, kind):
    """(output, input gradient, parameter gradients) of one forward and backward on device in precision kind."""
    layer.to(device)
    with precision.using(kind):
        y = layer.forward(on(device, x))
        dx = layer.backward(on(device, dy))
    return gn.to_numpy(y), None if dx is None else gn.to_numpy(dx), {k: gn.to_numpy(v) for k, v in layer.grads.items()}


def copy_of(layer):
    twin = type(layer).from_config(layer.to_config())
    twin.load_state_dict({k: gn.to_numpy(v) for k, v in layer.state_dict().items()})
    return twin


def _act64(name, z):
    z = numpy.asarray(z, "float64")
    return {None: z, "relu": numpy.maximum(z, 0), "sigmoid": 1 / (1 + numpy.exp(-z)), "tanh": numpy.tanh(z),
            "gelu": 0.5 * z * (1 + numpy.vectorize(math.erf)(z / math.sqrt(2)))}[name]


def _act64_grad(name, z):
    z = numpy.asarray(z, "float64")
    y = _act64(name, z)
    return {None: numpy.ones_like(z), "relu": (z > 0) * 1.0, "sigmoid": y * (1 - y), "tanh": 1 - y * y,
            "gelu": 0.5 * (1 + numpy.vectorize(math.erf)(z / math.sqrt(2))) + z * numpy.exp(-z * z / 2) / math.sqrt(
                2 * math.pi)}[name]


# ------------------------------------------------------------------ Dense: (a) and (b), bounds per element
DENSE_ACTIVATIONS = [None, "relu", "sigmoid", "tanh", "gelu"]


def dense_case(activation):
    gn.manual_seed(5)
    model = gn.Sequential(L.Dense(24, 9), {"relu": L.ReLU, "sigmoid": L.Sigmoid, "tanh": L.Tanh,
                                           "gelu": L.GELU}[activation]()) if activation else L.Dense(24, 9)
    dense = model.layers[0] if activation else model
    dense.params["bias"][...] = f32(9, seed=8, scale=0.3)
    return model, dense, f32(7, 24, seed=6), f32(7, 9, seed=7)


def dense_bounds(x, w, b, dy, activation, kind):
    """The bounds on y, dx, dW and db of a fused Dense from the same x, w, b and dy on two sides (or one
    side and the float64 reference): the forward's within linear16_atol, so each side's dz within
    activation_grad16_atol of the reference's, from the value its derivative reads (y for sigmoid and
    tanh; for ReLU the sign of z, which it reads from y)."""
    z = round16(x, kind) @ round16(w, kind).T + b
    z_atol = linear16_atol(x, w, b, None, kind)  # (the bias add's rounding included)
    if activation in ("sigmoid", "tanh"):
        y_atol = linear16_atol(x, w, b, activation, kind)
        dz_atol = activation_grad16_atol(dy, activation, _act64(activation, z), y_atol)
    else:
        dz_atol = activation_grad16_atol(dy, activation, z, z_atol)
    dz = dy * _act64_grad(activation, z) if activation else dy
    return linear16_atol(x, w, b, activation, kind), linear16_backward_atol(x, w, dz, dz_atol + ulps(dz, 1), kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", DENSE_ACTIVATIONS)
def test_dense_on_the_cpu_is_the_float64_product_of_rounded_operands(kind, activation):
    """(a): y = act(r(x) r(W)^T + b), dx = r(dz) r(W), dW = r(dz)^T r(x), db = sum dz, all in float64."""
    model, dense, x, dy = dense_case(activation)
    w, b = (gn.to_numpy(dense.params[k]).copy() for k in ("weight", "bias"))
    y, dx, grads = run(model, x, dy, "cpu", kind)
    z = round16(x, kind) @ round16(w, kind).T + b
    dz = dy * _act64_grad(activation, z)
    want = {"output": _act64(activation, z), "dx": round16(dz, kind) @ round16(w, kind),
            "dW": round16(dz, kind).T @ round16(x, kind), "db": dz.sum(axis=0)}
    y_atol, (dx_atol, dw_atol, db_atol) = dense_bounds(x, w, b, dy, activation, kind)
    case = f"dense {activation}"
    for what, got, bound in (("output", y, y_atol), ("dx", dx, dx_atol), ("dW", grads["0.weight" if activation else
                                                                                       "weight"], dw_atol),
                             ("db", grads["0.bias" if activation else "bias"], db_atol)):
        within(got, want[what], bound, (case, "ref", kind, what))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", DENSE_ACTIVATIONS)
def test_dense_on_the_gpu_is_the_cpu_within_the_16bit_bound(kind, activation):
    """(b), per element: the forward's operands are the same arrays on both devices (the same 16-bit
    values); the backward's dz is each side's own, within activation_grad16_atol of the reference's
    (crossing16 inside linear16_backward_atol covers a dz that rounds to a neighbouring 16-bit value)."""
    model, dense, x, dy = dense_case(activation)
    cpu_model = copy_of(model)
    w, b = (gn.to_numpy(dense.params[k]).copy() for k in ("weight", "bias"))
    want_y, want_dx, want_g = run(cpu_model, x, dy, "cpu", kind)
    y_atol, (dx_atol, dw_atol, db_atol) = dense_bounds(x, w, b, dy, activation, kind)
    y, dx, grads = run(model, x, dy, "gpu", kind)
    prefix = "0." if activation else ""
    for what, got, want, bound in (("output", y, want_y, y_atol), ("dx", dx, want_dx, dx_atol),
                                   ("dW", grads[prefix + "weight"], want_g[prefix + "weight"], dw_atol),
                                   ("db", grads[prefix + "bias"], want_g[prefix + "bias"], db_atol)):
        within(got, want, bound, (f"dense {activation}", "gpu", kind, what))


# ------------------------------------------------------------------ convolutions: (a) and (b)
CONVS = {"stride 1 (wide rows on the CPU)": (1, 1), "stride 2": (2, 1)}


def conv_case(stride, padding, fused):
    gn.manual_seed(6)
    conv = L.Conv2D(3, 4, 3, stride=stride, padding=padding)
    conv.params["bias"][...] = f32(4, seed=9, scale=0.3)
    model = gn.Sequential(conv, L.ReLU()) if fused else conv
    x = f32(2, 3, 7, 7, seed=10)
    out = (7 + 2 * padding - 3) // stride + 1
    return model, conv, x, f32(2, 4, out, out, seed=11)


def conv_reference(x, w, b, dy, kind, stride, padding, relu):
    """The float64 convolution of the rounded operands and its gradients (torch in float64)."""
    from torch.nn.grad import conv2d_input, conv2d_weight
    t = lambda a: torch.from_numpy(numpy.asarray(a, "float64"))  # noqa: E731
    rx, rw = t(round16(x, kind)), t(round16(w, kind))
    z = torch.nn.functional.conv2d(rx, rw, t(b), stride=stride, padding=padding).numpy()
    dz = numpy.asarray(dy, "float64") * (z > 0 if relu else 1.0)
    rdz = t(round16(dz, kind))
    return z, dz, {"output": numpy.maximum(z, 0) if relu else z,
                   "dx": conv2d_input(rx.shape, rw, rdz, stride, padding).numpy(),
                   "dW": conv2d_weight(rx, rw.shape, rdz, stride, padding).numpy(), "db": dz.sum(axis=(0, 2, 3))}


def conv_bounds(x, w, dy, z, kind, stride, padding, relu):
    z_atol = bias_act_atol(conv16_atol(x, w, kind, stride, padding), z)
    dz_atol = numpy.where(numpy.abs(z) <= z_atol, numpy.abs(dy), 0.0) if relu else numpy.zeros(z.shape)
    dz = dy * (z > 0) if relu else dy
    y_atol = bias_act_atol(conv16_atol(x, w, kind, stride, padding), z, "relu" if relu else None)
    return (y_atol, *conv16_backward_atol(x, w, dz, dz_atol + ulps(dz, 1), kind, stride, padding))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geometry", CONVS)
def test_conv2d_on_the_cpu_is_the_float64_convolution_of_rounded_operands(kind, geometry):
    """(a), both CPU paths (stride 1 over wide rows, stride 2 through im2col), fused with a ReLU."""
    stride, padding = CONVS[geometry]
    model, conv, x, dy = conv_case(stride, padding, True)
    w, b = (gn.to_numpy(conv.params[k]).copy() for k in ("weight", "bias"))
    y, dx, grads = run(model, x, dy, "cpu", kind)
    z, _, want = conv_reference(x, w, b, dy, kind, stride, padding, True)
    bounds = conv_bounds(x, w, dy, z, kind, stride, padding, True)
    for what, got, bound in zip(("output", "dx", "dW", "db"), (y, dx, grads["0.weight"], grads["0.bias"]), bounds):
        within(got, want[what], bound, (f"conv2d relu {geometry[:8]}", "ref", kind, what))


@pytest.mark.gpu
@pytest.mark.parametrize("gemm", ["fused", "wmma", "cublas", "gemmex"])  # (the GPU's four 16-bit product paths)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "relu"])
def test_conv2d_on_the_gpu_is_the_cpu_within_the_16bit_bound(monkeypatch, kind, fused, gemm):
    """(b), per element: the same rounded operands in the forward; dz differs only where a ReLU's sign
    may (|z| within the forward's bound). Each of the GPU's product paths in turn (CupyGemmPaths.product16)."""
    monkeypatch.setattr(ops_for_device("gpu"), "gemm_mode", gemm)
    model, conv, x, dy = conv_case(1, 1, fused)
    w, b = (gn.to_numpy(conv.params[k]).copy() for k in ("weight", "bias"))
    want_y, want_dx, want_g = run(copy_of(model), x, dy, "cpu", kind)
    z, _, _ = conv_reference(x, w, b, dy, kind, 1, 1, fused)
    bounds = conv_bounds(x, w, dy, z, kind, 1, 1, fused)
    y, dx, grads = run(model, x, dy, "gpu", kind)
    p = "0." if fused else ""
    for what, got, want, bound in zip(("output", "dx", "dW", "db"), (y, dx, grads[p + "weight"], grads[p + "bias"]),
                                      (want_y, want_dx, want_g[p + "weight"], want_g[p + "bias"]), bounds):
        within(got, want, bound, (f"conv2d {'relu' if fused else 'plain'}", "gpu", kind, what))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_conv_relu_maxpool_fused_on_the_gpu_is_the_cpu_within_the_16bit_bound(kind):
    """(b): Conv2D absorbing a ReLU and a MaxPool2D. The pooled maxima are within the conv's bound; the
    gradient goes to each window's maximum, so where two values of a window (or the maximum and 0) are
    within twice that bound, either side may send it elsewhere: every position of that window may
    differ by the window's |dp|."""
    gn.manual_seed(7)
    conv = L.Conv2D(2, 3, 3, padding=1)
    model = gn.Sequential(conv, L.ReLU(), L.MaxPool2D(2))
    x, dp = f32(2, 2, 6, 6, seed=12), f32(2, 3, 3, 3, seed=13)
    w, b = (gn.to_numpy(conv.params[k]).copy() for k in ("weight", "bias"))
    want_y, want_dx, want_g = run(copy_of(model), x, dp, "cpu", kind)
    z, _, _ = conv_reference(x, w, b, numpy.zeros((2, 3, 6, 6)), kind, 1, 1, True)
    z_atol = bias_act_atol(conv16_atol(x, w, kind, 1, 1), z)
    windows = _windows(numpy.maximum(z, 0))
    top2 = numpy.sort(windows, axis=-1)[..., -2:]
    slack = 2 * _windows(z_atol).max(axis=-1)
    unsure = (top2[..., 1] - top2[..., 0] <= slack) | (top2[..., 1] <= slack)
    dz_atol = numpy.repeat(numpy.repeat(numpy.where(unsure, numpy.abs(dp), 0.0), 2, axis=2), 2, axis=3)
    arg = windows.argmax(axis=-1)
    dz = numpy.zeros((2, 3, 3, 3, 4))
    numpy.put_along_axis(dz, arg[..., None], (dp * (top2[..., 1] > 0))[..., None], axis=-1)
    dz = dz.reshape(2, 3, 3, 3, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 6, 6)
    y_atol = _windows(bias_act_atol(conv16_atol(x, w, kind, 1, 1), z, "relu")).max(axis=-1)
    bounds = (y_atol, *conv16_backward_atol(x, w, dz, dz_atol + ulps(dz, 1), kind, 1, 1))
    y, dx, grads = run(model, x, dp, "gpu", kind)
    for what, got, want, bound in zip(("output", "dx", "dW", "db"), (y, dx, grads["0.weight"], grads["0.bias"]),
                                      (want_y, want_dx, want_g["0.weight"], want_g["0.bias"]), bounds):
        within(got, want, bound, ("conv relu maxpool", "gpu", kind, what))


def _windows(a):
    """(2, 3, 6, 6) -> (2, 3, 3, 3, 4): the four values of each 2x2 pooling window on the last axis."""
    return a.reshape(2, 3, 3, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 3, 3, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_conv1d_on_the_gpu_is_the_cpu_within_the_16bit_bound(kind):
    """(b): Conv1D is a Dense product over its im2col columns (the same on both sides), then col2im's
    float32 sums of at most k taps per input position."""
    gn.manual_seed(8)
    layer = L.Conv1D(3, 4, 3, stride=1, padding=1)
    x, dy = f32(2, 3, 9, seed=14), f32(2, 4, 9, seed=15)
    w2, b = gn.to_numpy(layer.params["weight"]).reshape(4, -1).copy(), gn.to_numpy(layer.params["bias"]).copy()
    want_y, want_dx, want_g = run(copy_of(layer), x, dy, "cpu", kind)
    cols = layer._im2col(numpy, x)  # (N*L, C*k)
    dz = dy.transpose(0, 2, 1).reshape(-1, 4)
    y_atol = linear16_atol(cols, w2, b, None, kind).reshape(2, 9, 4).transpose(0, 2, 1)
    dcols_atol, dw_atol, db_atol = linear16_backward_atol(cols, w2, dz, 0.0, kind)
    dcols = round16(dz, kind) @ round16(w2, kind)
    col2im = lambda a: layer._col2im(numpy, a, x.shape)  # noqa: E731  (a sum of at most k = 3 terms)
    dx_atol = col2im(dcols_atol) + 2 * gamma(3) * col2im(numpy.abs(dcols))
    y, dx, grads = run(layer, x, dy, "gpu", kind)
    for what, got, want, bound in (("output", y, want_y, y_atol), ("dx", dx, want_dx, dx_atol),
                                   ("dW", grads["weight"], want_g["weight"], dw_atol.reshape(4, 3, 3)),
                                   ("db", grads["bias"], want_g["bias"], db_atol)):
        within(got, want, bound, ("conv1d", "gpu", kind, what))


# ------------------------------------------------------------------ products in a chain: recorded rounding points
CHAIN = {  # the layers whose products feed each other: (make, input shape; ids for an Embedding)
    "lstm": (lambda: L.LSTM(5, 6), (2, 4, 5)),
    "gru": (lambda: L.GRU(5, 6), (2, 4, 5)),
    "rnn": (lambda: L.RNN(5, 6), (2, 4, 5)),
    "multi_head_attention": (lambda: L.MultiHeadAttention(8, 2, causal=True), (2, 5, 8)),
    "transformer_block": (lambda: L.TransformerBlock(8, 2, mlp_ratio=2), (2, 5, 8)),
    "embedding_lstm": (lambda: gn.Sequential(L.Embedding(6, 5), L.LSTM(5, 6)), (3, 4)),  # (absorbed: 6 rows < 12)
    "embedding_lstm_unfused": (lambda: gn.Sequential(L.Embedding(20, 5), L.LSTM(5, 6)), (2, 3)),
}


class Recorder:
    """Ops.gemm_operands and gemm_operands16 of one backend, recorded in one sequence: each call's float32
    inputs (a 16-bit one as its values) and the operands it gave (host copies of their float32 values)."""

    def __init__(self, monkeypatch, ops):
        self.calls, self.rounded_inside = [], {}
        for method in ("gemm_operands", "gemm_operands16"):  # (the GPU's Dense products cast to 16-bit arrays)
            monkeypatch.setattr(ops, method, self.recording(getattr(ops, method)))
        if ops.xp is not numpy:  # a Dense backward's dz comes rounded out of its kernel: recorded as unrounded
            from gpunet.backend import cuda_precision
            monkeypatch.setattr(cuda_precision, "bias_act_backward16",
                                self.rounding_inside(ops, cuda_precision.bias_act_backward16))

    def recording(self, original):
        def recorded(*arrays):
            out = original(*arrays)
            self.calls.append(([None if a is None else self.rounded_inside.get(id(a), (a, gn.to_numpy(a)))[1]
                                .astype("float32") for a in arrays],
                               [None if a is None else gn.to_numpy(a).astype("float32") for a in out]))
            return out
        return recorded

    def rounding_inside(self, ops, original):
        """bias_act_backward16, and the float32 dz it rounded (the float32 kernel's, on the same values)."""
        from gpunet.backend import cuda_wrappers

        def kernel(dy, z, y, activation, grad_bias, kind):
            dz = original(dy, z, y, activation, grad_bias, kind)
            unrounded = cuda_wrappers.bias_act_backward(dy, ops.stored_float32(z), ops.stored_float32(y), activation)
            self.rounded_inside[id(dz)] = (dz, gn.to_numpy(unrounded))  # (dz kept: its id is not reused)
            return dz
        return kernel


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(CHAIN))
def test_chained_products_round_at_the_same_points_on_the_gpu(monkeypatch, name, kind):
    """(b): the GPU rounds at the CPU's points (the same sequence of gemm_operands calls and shapes);
    every operand it computed is within the fp32 path bound of the CPU's, plus the changes of operands
    that rounded differently before it; outputs and every gradient within path16_atol."""
    make, shape = CHAIN[name]
    gn.manual_seed(9)
    model = make()
    x = rng(16).integers(0, 6, shape) if name.startswith("embedding") else f32(*shape, seed=16)
    twin = copy_of(model)
    y0 = gn.to_numpy(twin.forward(x))
    dy = f32(*y0.shape, seed=17)
    length, _ = reduction_path(model, tuple(x.shape))
    with monkeypatch.context() as m:
        cpu = Recorder(m, ops_for_device("cpu"))
        want_y, want_dx, want_g = run(twin, x, dy, "cpu", kind)
    with monkeypatch.context() as m:
        gpu_ops = ops_for_device("gpu")
        m.setattr(type(gpu_ops), "fused_attention16", False)  # (the fused kernels round inside: the test below)
        gpu = Recorder(m, gpu_ops)
        y, dx, grads = run(model, x, dy, "gpu", kind)
    assert [[None if a is None else a.shape for a in ins] for ins, _ in gpu.calls] == \
           [[None if a is None else a.shape for a in ins] for ins, _ in cpu.calls], "rounding points differ"
    changes = []
    for i, ((cpu_in, cpu_out), (gpu_in, gpu_out)) in enumerate(zip(cpu.calls, gpu.calls)):
        for a, b, ra, rb in zip(cpu_in, gpu_in, cpu_out, gpu_out):
            if a is None:
                continue
            assert_within(b, a, path16_atol(a, length, changes), f"{name} operand {i} before rounding")
            for side, given, got in (("CPU", a, ra), ("GPU", b, rb)):  # to nearest, ties to even
                assert numpy.array_equal(round16(given, kind), got.astype("float64")), f"{name} {side} operand {i}"
            changes.append(rounded_change(a, b, kind))
    RATIOS[(name, "gpu", kind, "operands crossed")] = float(sum(c > 0 for c in changes))
    for what, got, want in (("output", y, want_y), ("dx", dx, want_dx), *((k, grads[k], want_g[k]) for k in want_g)):
        if want is not None:
            within(got, want, path16_atol(want, length, changes), (name, "gpu", kind, what))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["multi_head_attention", "transformer_block"])
def test_fused_16bit_attention_against_the_cpu(monkeypatch, name, kind):
    """Mixed precision's attention on the GPU runs kernels/attention.cu's 16-bit kernels (one launch forward, two
    backward, on the 16-bit qkv the layer keeps), which round where the CPU's products round
    (tests/kernels/test_emulated.py checks each rounding point). Their own operands (the probabilities, dmixed,
    the scores' gradient) cannot be recorded, so every product operand of the step is allowed the most a crossing
    changes it (one 16-bit ulp, 2 U16 relative): path16_atol with that change for each."""
    from gpunet.backend import cuda_wrappers_sequence as kernels

    make, shape = CHAIN[name]
    gn.manual_seed(9)
    model = make()
    x = f32(*shape, seed=16)
    twin = copy_of(model)
    dy = f32(*gn.to_numpy(twin.forward(x)).shape, seed=17)
    length, _ = reduction_path(model, tuple(x.shape))
    with monkeypatch.context() as m:
        cpu = Recorder(m, ops_for_device("cpu"))
        want_y, want_dx, want_g = run(twin, x, dy, "cpu", kind)
    fused = []
    for wrapper in ("attention", "attention_backward"):
        original = getattr(kernels, wrapper)
        monkeypatch.setattr(kernels, wrapper, lambda qkv, *rest, _f=original, _w=wrapper: (
            fused.append((_w, qkv.dtype.name)), _f(qkv, *rest))[1])
    y, dx, grads = run(model, x, dy, "gpu", kind)
    assert fused == [("attention", "bfloat16" if kind == "bf16" else "float16"),
                     ("attention_backward", "bfloat16" if kind == "bf16" else "float16")]
    changes = [2 * U16[kind]] * sum(a is not None for ins, _ in cpu.calls for a in ins)
    for what, got, want in (("output", y, want_y), ("dx", dx, want_dx), *((k, grads[k], want_g[k]) for k in want_g)):
        if want is not None:
            within(got, want, path16_atol(want, length, changes), (name + " fused", "gpu", kind, what))


# ------------------------------------------------------------------ (c) fp32 unchanged, (d) 16-bit storage
def storage_cases():
    gn.manual_seed(10)
    cases = {
        "dense_relu": (gn.Sequential(L.Dense(6, 5), L.ReLU()), f32(4, 6), {("x", "y")}),
        "dense_gelu": (L.Dense(6, 5, activation="gelu"), f32(4, 6), {("x",)}),
        "relu_layer": (gn.Sequential(L.Dense(6, 5), L.Tanh(), L.ReLU()), f32(4, 6), {("x",), ("y",)}),
        "conv2d_relu": (gn.Sequential(L.Conv2D(2, 3, 3, padding=1), L.ReLU()), f32(2, 2, 5, 5), {("cols", "y")}),
        "conv2d_relu_pool": (gn.Sequential(L.Conv2D(2, 3, 3), L.ReLU(), L.MaxPool2D(2)), f32(2, 2, 6, 6),
                             {("cols", "pooled")}),
        "conv2d_stride2": (L.Conv2D(2, 3, 3, stride=2), f32(2, 2, 7, 7), {("cols",)}),
        "conv1d": (L.Conv1D(2, 3, 3, padding=1), f32(2, 2, 6), set()),  # (see docs/precision.md)
        "lstm": (L.LSTM(4, 5), f32(2, 3, 4), {("hs", "xs")}),
        "gru": (L.GRU(4, 5), f32(2, 3, 4), {("xs",)}),
        "rnn": (L.RNN(4, 5), f32(2, 3, 4), {("xs",)}),
        "multi_head_attention": (L.MultiHeadAttention(8, 2), f32(2, 3, 8), {("mixed", "state", "x2")}),
        "transformer_block": (L.TransformerBlock(8, 2, mlp_ratio=2), f32(2, 3, 8),
                              {("mixed", "state", "x2"), ("x",)}),
        "embedding_lstm": (gn.Sequential(L.Embedding(5, 4), L.LSTM(4, 5)), rng(1).integers(0, 5, (3, 4)),
                           {("hs",)}),
    }
    return cases


STORAGE = sorted(storage_cases())


def saved_states(model):
    """Every saved namespace of the model's layers (an absorbed recurrent layer's through its Embedding)."""
    found = []
    for layer in model._subtree():
        state = layer._saved
        if state is not None and not getattr(state, "absorbed", False):
            found.append(state)
            recurrent = getattr(state, "recurrent", None)
            if recurrent is not None:
                found.append(recurrent[1])
    return found


def _is16(value) -> bool:
    return getattr(value, "dtype", None) is not None and is_16bit(value)


def sixteen_bit_names(state) -> tuple:
    """The names under which a saved state keeps a 16-bit array (directly, or in a tuple: attention's state)."""
    return tuple(key for key, value in sorted(vars(state).items())
                 if _is16(value) or (isinstance(value, tuple) and any(_is16(v) for v in value)))


def as_float32(state) -> None:
    """Each 16-bit array the state keeps replaced by a float32 array of its values (a tuple's too)."""
    for key in sixteen_bit_names(state):
        value = getattr(state, key)
        if isinstance(value, tuple):
            setattr(state, key, tuple(v.astype("float32") if _is16(v) else v for v in value))
        else:
            setattr(state, key, value.astype("float32"))


@pytest.mark.parametrize("name", STORAGE)
def test_fp32_is_what_the_layers_give_outside_a_precision_context(device, name):
    """(c): bit for bit, forward and every gradient (the rounding points are no-ops in fp32)."""
    model, x, _ = storage_cases()[name]
    model.to(device)
    results = []
    for context in (contextlib.nullcontext(), precision.using("fp32")):
        with context:
            y = model.forward(on(device, x))
            dx = model.backward(on(device, f32(*y.shape, seed=19)))
        results.append([gn.to_numpy(y).copy(), None if dx is None else gn.to_numpy(dx).copy(),
                        *(gn.to_numpy(g).copy() for g in model.grads.values())])
        assert all(not sixteen_bit_names(s) for s in saved_states(model)), "a 16-bit array kept in fp32"
    for a, b in zip(*results):
        assert (a is None and b is None) or (a.tobytes() == b.tobytes() and a.dtype == b.dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", STORAGE)
def test_kept_activations_are_16bit_and_the_backward_is_as_from_float32(device, name, kind):
    """(d): which arrays each layer keeps in 16 bits (docs/precision.md's table), and the backward from
    them bit for bit the backward from float32 arrays holding the same values."""
    model, x, expected = storage_cases()[name]
    model.to(device)
    dy = None
    results = []
    for widen in (False, True):
        with precision.using(kind):
            y = model.forward(on(device, x))
            states = saved_states(model)
            if not widen:
                assert {sixteen_bit_names(s) for s in states} - {()} == expected
                for s in states:
                    for key in sixteen_bit_names(s):
                        value = getattr(s, key)
                        for a in (value if isinstance(value, tuple) else (value,)):
                            if _is16(a):
                                assert a.dtype.name == {"bf16": "bfloat16", "fp16": "float16"}[kind], key
            else:
                for s in states:
                    as_float32(s)
                assert all(not sixteen_bit_names(s) for s in saved_states(model))
            dy = on(device, f32(*y.shape, seed=18)) if dy is None else dy
            dx = model.backward(dy)
        results.append([None if dx is None else gn.to_numpy(dx).copy(),
                        *(gn.to_numpy(g).copy() for g in model.grads.values())])
    for a, b in zip(*results):
        assert (a is None and b is None) or a.tobytes() == b.tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_a_relu_output_is_kept_once_for_the_next_product(device, kind):
    """A ReLU's 16-bit output is the next Dense's kept input, the same array (Ops.store_16bit's hand_on),
    through a Flatten too; a layer between that makes a new array (Dropout) gets its own copy."""
    gn.manual_seed(4)
    shared = gn.Sequential(L.Conv2D(1, 2, 3), L.ReLU(), L.Flatten(), L.Dense(2 * 4 * 4, 5), L.ReLU(),
                           L.Dense(5, 3)).to(device)
    apart = gn.Sequential(L.Dense(6, 5), L.ReLU(), L.Dropout(0.5), L.Dense(5, 3)).to(device)
    with precision.using(kind):
        shared.forward(on(device, f32(2, 1, 6, 6)))
        apart.forward(on(device, f32(4, 6)))
    conv, dense1, dense2 = shared.layers[0], shared.layers[3], shared.layers[5]
    assert dense1.saved.x is not None and dense1.saved.x.dtype.itemsize == 2
    assert gn.to_numpy(dense1.saved.x).tobytes() == gn.to_numpy(conv.saved.y).reshape(2, -1).tobytes()
    assert _same_buffer(dense1.saved.x, conv.saved.y) and _same_buffer(dense2.saved.x, dense1.saved.y)
    assert not _same_buffer(apart.layers[3].saved.x, apart.layers[0].saved.y)


def _same_buffer(a, b) -> bool:
    if isinstance(a, numpy.ndarray):
        return numpy.shares_memory(a, b)
    return a.data.ptr == b.data.ptr


def test_the_ops_keep_arrays_in_16_bits_only_in_mixed_precision():
    ops = ops_for_device("cpu")
    x = f32(3, 4)
    assert ops.store_16bit(x) is x and ops.gemm_operands(x, None) == (x, None)
    for kind, bits in (("bf16", 8), ("fp16", 11)):
        with precision.using(kind):
            kept = ops.store_16bit(x)
            assert is_16bit(kept) and numpy.array_equal(ops.stored_float32(kept), round16(x, kind))
            a, none, back = ops.gemm_operands(x, None, kept)
            assert none is None and numpy.array_equal(a, round16(x, kind)) and numpy.array_equal(back, a)
            assert numpy.abs(a - x).max() <= U16[kind] * numpy.abs(x).max()  # (nearest: half an ulp)
        assert 2.0 ** -bits == U16[kind]
    assert ops.stored_float32(None) is None and ops.store_16bit(None) is None


def test_the_16bit_crossing_bound_is_one_ulp_only_where_a_boundary_is_near():
    """crossing16: 0 without a boundary within a_atol, one neighbour's distance with one."""
    from tests.support.tolerance import crossing16
    ulp = 2.0 ** -7  # bf16's ulp in [1, 2)
    assert crossing16(numpy.array([1.5], "float32"), 1e-6, "bf16")[0] == 0.0
    tie = numpy.array([1.5 + ulp / 2], "float32")  # a boundary itself: 1.5 (even) below, 1.5 + ulp above
    assert crossing16(tie, 1e-6, "bf16")[0] == ulp and crossing16(tie, 0.0, "bf16")[0] == 0.0
    assert crossing16(numpy.array([1.5 + ulp / 4], "float32"), ulp / 2, "bf16")[0] == ulp
    assert crossing16(numpy.array([1.5 + ulp / 4], "float32"), ulp / 8, "bf16")[0] == 0.0


def test_memory_kept_for_the_backward(capsys):
    """The bytes the layers keep for the backward of the mlp, cnn and rnn recipes' models (and the
    transformer's), per precision, each buffer once: printed for docs/precision.md. With the input batch
    counted (an fp32 first layer keeps it alive, a mixed-precision one keeps its 16-bit copy instead),
    mixed precision keeps less than fp32 for each."""
    from gpunet import models
    gn.manual_seed(0)
    cases = {"mlp": (models.mlp(), f32(32, 784)), "wide_cnn": (models.wide_cnn(), f32(8, 1, 28, 28)),
             "char_rnn": (models.char_rnn(65), rng(2).integers(0, 65, (8, 64))),
             "transformer": (models.transformer(65, context=64), rng(2).integers(0, 65, (8, 64)))}
    table = {}
    for name, (model, x) in cases.items():
        row = []
        for kind in ("fp32", "bf16", "fp16"):
            with precision.using(kind):
                model.forward(x)
            row.append((kept_bytes(model, x, with_input=True), kept_bytes(model, x, with_input=False)))
        table[name] = row
        assert row[1][0] < row[0][0] and row[2][0] < row[0][0], name
    with capsys.disabled():
        print("\nbytes kept for the backward: fp32, bf16 (ratio), fp16 (ratio); with the input batch, then without")
        for name, row in table.items():
            for i, label in ((0, "with input"), (1, "without")):
                full, bf, fp = (r[i] for r in row)
                print(f"  {name:12s} {label:10s} {full:>9d} {bf:>9d} ({bf / full:.2f}) {fp:>9d} ({fp / full:.2f})")


def kept_bytes(model, x, with_input: bool) -> int:
    """Bytes of the arrays the layers' saved states hold, each buffer once; x itself (a first layer keeps
    it, or an Embedding its ids) only with_input."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif isinstance(value, SimpleNamespace):
            for v in vars(value).values():
                visit(v)
        elif isinstance(value, numpy.ndarray):
            base = value
            while isinstance(base.base, numpy.ndarray):
                base = base.base
            if id(base) in seen or (not with_input and numpy.shares_memory(base, x)):
                return
            seen.add(id(base))
            total += base.nbytes
    for state in saved_states(model):
        visit(state)
    return total
