"""Tolerances for comparing two float32 implementations of an op (our kernel and NumPy, CPU and
GPU, two BLAS paths, fused and unfused), derived from the lengths of the sums the op runs and the
operands' magnitudes, not from what one machine gave: the suite must pass on any x86-64 CPU, any
core count, any OpenBLAS kernel (OPENBLAS_CORETYPE) and thread count.

The argument is Higham's (Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.1): a
float32 sum of K terms, in any order, blocked or not, with FMA or not, is within
gamma_K * sum|terms| of the exact sum, gamma_K = K u / (1 - K u), u = 2^-24. Two implementations
each err that much, so they differ by at most 2 gamma_K sum|terms| (for a dot product the terms
are a_k b_k: the bound is 2 gamma_K (|A| @ |B|), computed in float64). This is the worst case
(every rounding of one sign): it holds on every machine, and it is still tight enough to catch a
wrong, swapped or missing term of ordinary size (tests/test_tolerance_mutations.py plants them).

Elementwise functions (exp, tanh, erf, log, rsqrt) are within a few ulps of the exact value:
CUDA's expf/tanhf/erff within 2 ulps (CUDA C Programming Guide, table of single-precision
functions); NumPy's float32 SIMD versions (its own AVX2/AVX-512 exp and log, SVML's on AVX-512)
and glibc's within the few ulps NumPy's accuracy tests hold them to; NumpyOps' own float32 erf
within 4e-7 (tests/backend/test_ops.py checks it). So each side is taken within ULPS = 4 ulps,
and one ulp of x is at most 2u |x|. A subnormal result may be flushed to zero (TINY).
An error e in an activation's input moves its output by at most SLOPE[name] * e (the largest
|f'|). torch.testing's default float32 tolerances (rtol 1.3e-6, atol 1e-5) reason the same way,
per dtype; here the reduction length enters too, so a long sum gets the room it needs and a short
one no more.

Comparisons of whole layers against PyTorch chain many ops; there `path_atol` follows
gpunet.parity_bound (the lead's model-level bound): the sum lengths along the layer's forward and
backward, each allowed LAMBDA sqrt(K) u of the output's size.
"""
from __future__ import annotations

import math

import numpy

from gpunet.parity_bound import LAMBDA, PER_FUNCTION, reduction_path

U = 2.0**-24  # float32 unit roundoff
TINY = float(numpy.finfo("float32").tiny)  # the smallest normal float32, 1.2e-38
ULPS = 4  # an elementwise function on either side: within 4 ulps of exact (see above)
# the largest |f'(x)|: gelu's is Phi(x) + x phi(x) at x = sqrt(2), 1.129; gelu_tanh's is within 1e-3 of it
SLOPE = {None: 1.0, "relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "gelu": 1.13, "gelu_tanh": 1.13}


def gamma(k: int, u: float = U) -> float:
    """Higham's gamma_k: the relative error bound of k float operations in sequence."""
    assert k * u < 1, k
    return k * u / (1 - k * u)


def ulps(value, count: int = ULPS) -> numpy.ndarray:
    """count ulps of float32 |value|, elementwise, in float64 (one ulp of x is at most 2u|x|;
    numpy.spacing gives it exactly), plus TINY: a kernel may flush a subnormal result to zero
    (CUDA's -ftz, Numba's fastmath)."""
    return count * numpy.spacing(numpy.abs(numpy.asarray(value, dtype="float32"))).astype("float64") + TINY


def elementwise_atol(size, roundings: int, functions: int = 0) -> numpy.ndarray:
    """An elementwise chain (no sums over an axis) from the same inputs on both sides: at most
    `roundings` roundings and `functions` elementwise functions (ULPS each) of terms of total
    size `size` (the caller's sum of |terms|, which covers cancellation). Two sides."""
    return 2 * (roundings + functions * ULPS) * 2 * U * numpy.abs(numpy.asarray(size, "float64")) + TINY


def matmul_atol(a, b) -> numpy.ndarray:
    """The bound on |C1 - C2| for two float32 products C = a @ b: 2 gamma_K (|a| @ |b|), K the
    inner length (gamma_K counts the K products' and sums' roundings, the final one included)."""
    a64, b64 = numpy.abs(numpy.asarray(a, "float64")), numpy.abs(numpy.asarray(b, "float64"))
    return 2 * gamma(max(a64.shape[-1], 1)) * (a64 @ b64)


def sum_atol(terms, axis=None) -> numpy.ndarray:
    """The bound on two float32 sums of `terms` over axis (any order): 2 gamma_K sum|terms|."""
    terms = numpy.abs(numpy.asarray(terms, "float64"))
    k = terms.size if axis is None else math.prod(terms.shape[i] for i in numpy.atleast_1d(axis))
    return 2 * gamma(max(k, 1)) * terms.sum(axis=axis)


def bias_act_atol(pre_atol, pre, activation=None) -> numpy.ndarray:
    """A bias add, then an activation, after a sum known within pre_atol: the add rounds once on
    each side (2 ulps of the pre-activation), the activation scales the error by its slope and
    adds its own ULPS on each side."""
    pre = numpy.asarray(pre, "float64")
    inner = pre_atol + ulps(pre, 2)
    if activation is None:
        return inner
    return SLOPE[activation] * inner + 2 * ulps(_activate(activation, pre))


def linear_atol(x, w, b=None, activation=None) -> numpy.ndarray:
    """Dense's forward, x @ w.T (+ b) then activation: matmul_atol, then bias_act_atol."""
    z = numpy.asarray(x, "float64") @ numpy.asarray(w, "float64").T
    pre_atol = matmul_atol(x, numpy.asarray(w).T)
    if b is not None:
        z = z + numpy.asarray(b, "float64")
    return bias_act_atol(pre_atol, z, activation)


def activation_grad_atol(dy, activation=None) -> numpy.ndarray:
    """dz = dy * f'(z) from the same z, y and dy on both sides: exact for none and ReLU (a select);
    else f' is a sum of terms of total size at most 2 (sigmoid's y(1-y), tanh's 1 - y^2, gelu's
    cdf + x pdf, gelu_tanh's three) each within ULPS + 4 ulps (an erf, exp or tanh and up to four
    roundings), so dz is within that times 2|dy| on each side."""
    dy = numpy.asarray(dy, "float64")
    if activation in (None, "relu"):
        return numpy.zeros_like(dy)
    return 2 * (ULPS + 4) * 2 * U * 2 * numpy.abs(dy) + TINY


def linear_backward_atol(x, w, dz, dz_atol):
    """The bounds on dx = dz @ w (K = out features), dW = dz.T @ x (K = rows) and db = sum of dz
    over the rows, from dz known within dz_atol: the products' own bound plus what dz's error
    carries through |w|, |x| and the sum."""
    dz, dz_atol = numpy.asarray(dz, "float64"), numpy.asarray(dz_atol, "float64")
    x64, w64 = numpy.abs(numpy.asarray(x, "float64")), numpy.abs(numpy.asarray(w, "float64"))
    dx = matmul_atol(dz, w64) + dz_atol @ w64
    dw = matmul_atol(dz.T, x64) + dz_atol.T @ x64
    db = sum_atol(dz, 0) + dz_atol.sum(axis=0)
    return dx, dw, db


def conv_atol(x, w, stride=1, padding=0) -> numpy.ndarray:
    """A 2-D (NCHW) or 1-D (NCL) convolution through im2col is a GEMM of inner length
    K = C * taps: 2 gamma_K times the same convolution of |x| and |w| in float64."""
    import torch
    conv = torch.nn.functional.conv2d if numpy.ndim(x) == 4 else torch.nn.functional.conv1d
    ax = torch.from_numpy(numpy.abs(numpy.asarray(x, "float64")))
    aw = torch.from_numpy(numpy.abs(numpy.asarray(w, "float64")))
    k = math.prod(aw.shape[1:])
    return 2 * gamma(k) * conv(ax, aw, stride=stride, padding=padding).numpy()


def conv_backward_atol(x, w, dy, stride=1, padding=0):
    """The bounds on a 2-D convolution's dx (sums of out_c kh kw terms dy w), dW (sums over the
    N OH OW positions of dy x) and db (sums of dy over those positions), each 2 gamma_K times the
    same gradient of |x|, |w|, |dy| in float64."""
    import torch
    from torch.nn.grad import conv2d_input, conv2d_weight
    ax, aw, ady = (torch.from_numpy(numpy.abs(numpy.asarray(a, "float64"))) for a in (x, w, dy))
    positions = ady.shape[0] * ady.shape[2] * ady.shape[3]
    dx = 2 * gamma(math.prod(aw.shape) // aw.shape[1]) * conv2d_input(ax.shape, aw, ady, stride, padding).numpy()
    dw = 2 * gamma(positions) * conv2d_weight(ax, aw.shape, ady, stride, padding).numpy()
    return dx, dw, sum_atol(dy, (0, 2, 3))


def softmax_atol(z, axis=-1) -> numpy.ndarray:
    """Softmax p_i = exp(z_i - m) / sum_j exp(z_j - m) over C values (m the largest), z the
    float64 values of what the kernels see (logits, or scores times their scale). On each side:
    z_i - m (and a scale before it) rounds within u (|z_i| + |m| + |z_i - m|) absolute, which exp
    turns into that much relative; exp within ULPS ulps; the sum of C positive terms within
    gamma_C relative; one division. Two sides, so twice that, times p_i; plus an ulp for p_i that
    underflow."""
    z = numpy.asarray(z, "float64")
    m = numpy.max(numpy.where(numpy.isneginf(z), -numpy.inf, z), axis=axis, keepdims=True)
    shifted = numpy.where(numpy.isneginf(z), -numpy.inf, z - m)
    p = numpy.exp(shifted) / numpy.exp(shifted).sum(axis=axis, keepdims=True)
    spread = numpy.where(numpy.isneginf(z), 0.0, numpy.abs(z) + numpy.abs(m) + numpy.abs(shifted))
    rel = U * spread + gamma(z.shape[axis]) + (ULPS + 1) * 2 * U
    return 2 * rel * p + ulps(p, 1)


def softmax_backward_atol(probs, dprobs, scale=1.0, axis=-1) -> numpy.ndarray:
    """d = scale p (dp - sum(dp p)) from the same p and dp on both sides: the sum over C within
    2 gamma_C sum|dp p|, then a subtraction and two products (3 roundings of the result's size)."""
    p, dp = numpy.asarray(probs, "float64"), numpy.asarray(dprobs, "float64")
    s = (dp * p).sum(axis=axis, keepdims=True)
    inner = sum_atol(dp * p, axis) if axis is None else numpy.expand_dims(sum_atol(dp * p, axis), axis)
    return abs(scale) * p * (inner + 2 * 3 * 2 * U * numpy.abs(dp - s)) + ulps(scale * p * (dp - s), 1)


def xent_atol(z, labels) -> float:
    """The mean softmax cross-entropy of logits z (rows, C) at labels: per row log(sum) - (z_y - m).
    The sum's relative error (as in softmax_atol, weighted by p) becomes log's absolute error, log
    adds ULPS ulps, z_y - m rounds within u (|z_y| + |m|); the mean over R rows adds gamma_R of
    the mean |row loss|. Two sides."""
    z = numpy.asarray(z, "float64")
    rows = numpy.arange(len(z))
    m = z.max(axis=1)
    e = numpy.exp(z - m[:, None])
    p = e / e.sum(axis=1, keepdims=True)
    row_loss = numpy.log(e.sum(axis=1)) - (z[rows, labels] - m)
    spread = numpy.where(numpy.isneginf(z), 0.0, numpy.abs(z) + numpy.abs(m)[:, None] + numpy.abs(z - m[:, None]))
    sum_rel = U * (p * spread).sum(axis=1) + gamma(z.shape[1]) + ULPS * 2 * U
    per_row = sum_rel + ulps(numpy.log(e.sum(axis=1))) + U * (numpy.abs(z[rows, labels]) + numpy.abs(m)) \
        + ulps(row_loss, 1)
    return float(2 * (per_row.mean() + gamma(len(z)) * numpy.abs(row_loss).mean()))


def xent_grad_atol(z, want_grad) -> numpy.ndarray:
    """The mean softmax cross-entropy's gradient (softmax - onehot) / R over R rows of logits z:
    the softmax's bound, one rounding for the subtraction, one for the division."""
    rows = len(z)
    return (softmax_atol(z, axis=1) + ulps(want_grad * rows, 1)) / rows + ulps(want_grad, 1)


def path_atol(want, length: int) -> float:
    """A chain of sums of total length `length` (a layer's forward and backward), as
    gpunet.parity_bound bounds a step: each sum of K terms moves the result by at most
    LAMBDA sqrt(K) u sum|terms| <= LAMBDA K u of the output's size, on each side."""
    size = float(numpy.abs(numpy.asarray(want, "float64")).max(initial=0.0))
    return 2 * LAMBDA * (length + PER_FUNCTION) * U * size + TINY


def layer_atol(layer, input_shape, want) -> float:
    """path_atol over the sums one forward and backward of `layer` runs (parity_bound's count)."""
    length, _ = reduction_path(layer, tuple(input_shape))
    return path_atol(want, length)


def assert_within(got, want, atol, what: str) -> float:
    """|got - want| <= atol elementwise (atol broadcasts); NaN only where want has NaN. Fails
    naming the worst element, its bound and the ratio; returns the worst ratio (<= 1)."""
    got64 = numpy.asarray(got, "float64")
    want64 = numpy.asarray(want, "float64")
    assert got64.shape == want64.shape, f"{what}: shape {got64.shape} != {want64.shape}"
    nan_got, nan_want = numpy.isnan(got64), numpy.isnan(want64)
    assert (nan_got == nan_want).all(), f"{what}: NaN at {numpy.argwhere(nan_got != nan_want)[0].tolist()}"
    diff = numpy.where(nan_want, 0.0, numpy.abs(got64 - want64))
    bound = numpy.broadcast_to(numpy.asarray(atol, "float64"), diff.shape)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        ratio = numpy.where(bound > 0, diff / bound, numpy.where(diff > 0, numpy.inf, 0.0))
    if ratio.size == 0:
        return 0.0
    worst = numpy.unravel_index(int(numpy.argmax(ratio)), ratio.shape)
    r = float(ratio[worst])
    assert r <= 1, (f"{what}: element {tuple(int(i) for i in worst)}: got {got64[worst]:.9g}, want {want64[worst]:.9g}, "
                    f"|diff| {diff[worst]:.3g} > bound {bound[worst]:.3g} (ratio {r:.3g})")
    return r


def _activate(name, z):
    from gpunet.backend.ops import Ops
    return numpy.asarray(Ops().activation(name, numpy.asarray(z, "float64")), "float64")


# ------------------------------------------------------------------ mixed precision (bf16, fp16)
# In mixed precision every matrix product rounds its float32 operands to the 16-bit format (to nearest
# even) and multiplies those in float32: each product of two 16-bit numbers is exact (8 + 8 or 11 + 11
# significant bits fit float32's 24), so the sums are the only float32 roundings, as in fp32. Two sides
# (the CPU and the GPU, or the CPU and a float64 reference) that round the same float32 operands get the
# same 16-bit operands and differ by the float32 sums' bound alone (matmul_atol of the rounded operands).
# Where a side's float32 operand already differs from the other's (it was computed: dz, h, the
# probabilities), by at most a_atol, the rounding removes that difference unless a rounding boundary (the
# midpoint between two 16-bit neighbours) lies within a_atol of the operand: then the two 16-bit values
# are neighbours, one 16-bit ulp apart. An ulp of x is at most 2 U16 |x| (2^-7 |x| for bf16, 2^-10 |x|
# for fp16) and at least U16 |x|, U16 the unit roundoff (2^-8 and 2^-11). crossing16 computes that
# change per element: rounding is monotone, so the 16-bit values of everything within a_atol of a lie
# between those of a - a_atol and a + a_atol. A product whose operands come in unchanged (weights, the
# layer's input, the upstream gradient) gets no such term: both sides round the same array.

U16 = {"bf16": 2.0**-8, "fp16": 2.0**-11}  # unit roundoff: 8 and 11 significant bits
# the largest |f''| of an activation, in the variable its derivative reads (docs: activations.from_output):
# sigmoid' = y (1 - y) and tanh' = 1 - y^2 read y, slopes 1 and 2; gelu' reads z, gelu'' = phi(z) (2 - z^2)
# is at most 2 phi(0) = 0.80 (1 covers gelu_tanh's too); relu and none: a select, see activation_grad16_atol
CURVATURE = {"sigmoid": 1.0, "tanh": 2.0, "gelu": 1.0, "gelu_tanh": 1.0}


def round16(a, kind: str) -> numpy.ndarray:
    """float32(a) rounded to kind's 16-bit format (to nearest even, as NumPy/ml_dtypes and the GPU do), in float64."""
    from gpunet.backend.ops import sixteen_bit_dtype
    with numpy.errstate(over="ignore", invalid="ignore"):
        return numpy.asarray(a, "float32").astype(sixteen_bit_dtype(kind)).astype("float64")


def crossing16(a, a_atol, kind: str) -> numpy.ndarray:
    """The most the 16-bit values of an operand can differ between two sides whose float32 operands are
    both within a_atol of a (elementwise; a may be one side's, or a reference's): |r(a + a_atol) - r(a - a_atol)|,
    which bounds |r(a1) - r(a2)| for every float32 a1, a2 in between (rounding is monotone). 0 where a_atol
    is 0 or no rounding boundary lies within a_atol (the rounding removes the difference); one 16-bit ulp
    where one does (more only where a_atol is as large as an ulp). The ends are taken one float32 step
    further out, so that every float32 in between is covered."""
    a64 = numpy.asarray(a, "float32").astype("float64")
    t = numpy.broadcast_to(numpy.abs(numpy.asarray(a_atol, "float64")), a64.shape)
    with numpy.errstate(over="ignore"):
        lo = numpy.nextafter((a64 - t).astype("float32"), numpy.float32(-numpy.inf))
        hi = numpy.nextafter((a64 + t).astype("float32"), numpy.float32(numpy.inf))
    return numpy.where(t > 0, round16(hi, kind) - round16(lo, kind), 0.0)


def matmul16_atol(a, b, kind: str, a_atol=0.0, b_atol=0.0, sides: int = 2) -> numpy.ndarray:
    """The bound on |C1 - C2| for C = r(a) @ r(b), the 16-bit roundings of float32 operands multiplied
    exactly and summed in float32, on two sides whose operands are within a_atol and b_atol of a and b
    (zero: the same arrays on both sides). Each side's float32 sum of K exact products is within
    gamma_K (|r(a)| @ |r(b)|) of its exact value (the other side's operands are within da and db of
    these, crossing16); the exact values differ by da @ |r(b)| + |r(a)| @ db + da @ db. sides=1: against
    an exact (float64) product of the same rounded operands, only this side's sums err."""
    ra, rb = numpy.abs(round16(a, kind)), numpy.abs(round16(b, kind))
    da, db = crossing16(a, a_atol, kind), crossing16(b, b_atol, kind)
    g = gamma(max(ra.shape[-1], 1))
    sums = g * (ra @ rb) if sides == 1 else g * (ra @ rb + (ra + da) @ (rb + db))
    return sums + da @ rb + ra @ db + da @ db


def linear16_atol(x, w, b, activation, kind: str, sides: int = 2) -> numpy.ndarray:
    """Dense's forward in mixed precision, activation(r(x) @ r(w).T + b) from the same x, w and b on
    both sides: matmul16_atol, then bias_act_atol as in fp32 (the bias add and the activation are float32)."""
    z = round16(x, kind) @ round16(w, kind).T
    if b is not None:
        z = z + numpy.asarray(b, "float64")
    return bias_act_atol(matmul16_atol(x, numpy.asarray(w).T, kind, sides=sides), z, activation)


def activation_grad16_atol(dy, activation, pre, pre_atol) -> numpy.ndarray:
    """dz = dy * f'(pre) when each side has its own pre (the value f' reads: y for relu, sigmoid and tanh,
    z for gelu) within pre_atol of the other's, from the same dy: activation_grad_atol (the same pre on
    both sides) plus |dy| CURVATURE pre_atol. A select (relu; none reads nothing) differs only where the
    sign of pre may differ, |pre| <= pre_atol: there by |dy|."""
    dy, pre = numpy.abs(numpy.asarray(dy, "float64")), numpy.asarray(pre, "float64")
    if activation is None:
        return numpy.zeros_like(dy)
    if activation == "relu":
        return numpy.where(numpy.abs(pre) <= pre_atol, dy, 0.0)
    return activation_grad_atol(dy, activation) + dy * CURVATURE[activation] * pre_atol


def linear16_backward_atol(x, w, dz, dz_atol, kind: str, sides: int = 2):
    """The bounds on dx = r(dz) @ r(w) and dW = r(dz).T @ r(x) (matmul16_atol, dz within dz_atol between
    the sides, x and w the same) and on db = the float32 sum of dz itself over the rows (as in fp32)."""
    dz, dz_atol = numpy.asarray(dz, "float32"), numpy.broadcast_to(numpy.asarray(dz_atol, "float64"), numpy.shape(dz))
    dx = matmul16_atol(dz, w, kind, dz_atol, sides=sides)
    dw = matmul16_atol(dz.T, x, kind, dz_atol.T, sides=sides)
    return dx, dw, sum_atol(dz, 0) + dz_atol.sum(axis=0)


def conv16_atol(x, w, kind: str, stride=1, padding=0) -> numpy.ndarray:
    """A convolution of the rounded x and w (the same on both sides): conv_atol of r(x) and r(w)."""
    return conv_atol(round16(x, kind), round16(w, kind), stride, padding)


def conv16_backward_atol(x, w, dz, dz_atol, kind: str, stride=1, padding=0):
    """The bounds on a 2-D convolution's dx, dW (products of r(dz) with r(w) and r(x), dz within dz_atol
    between the sides: conv_backward_atol's sums over the operands as large as either side's, plus what
    the change of r(dz), crossing16, carries through |r(w)| and |r(x)|) and db (the float32 sums of dz)."""
    import torch
    from torch.nn.grad import conv2d_input, conv2d_weight
    dz = numpy.asarray(dz, "float32")
    ddz = crossing16(dz, dz_atol, kind)
    ax, aw = numpy.abs(round16(x, kind)), numpy.abs(round16(w, kind))
    dx, dw, _ = conv_backward_atol(ax, aw, numpy.abs(round16(dz, kind)) + ddz, stride, padding)
    t = [torch.from_numpy(a) for a in (ax, aw, ddz)]
    dx = dx + conv2d_input(t[0].shape, t[1], t[2], stride, padding).numpy()
    dw = dw + conv2d_weight(t[0], t[1].shape, t[2], stride, padding).numpy()
    db = sum_atol(dz, (0, 2, 3)) + numpy.broadcast_to(numpy.asarray(dz_atol, "float64"), dz.shape).sum(axis=(0, 2, 3))
    return dx, dw, db


def rounded_change(a1, a2, kind: str) -> float:
    """How far two sides' 16-bit operands are apart, relative to this side's, elementwise at most:
    max |r(a1) - r(a2)| / |r(a1)| (0 when they rounded alike, as they do unless a boundary lay between)."""
    r1, r2 = round16(a1, kind), round16(a2, kind)
    diff = numpy.abs(r1 - r2)
    if not diff.any():
        return 0.0
    with numpy.errstate(divide="ignore", invalid="ignore"):
        return float(numpy.where(diff > 0, diff / numpy.abs(r1), 0.0).max())


def path16_atol(want, length: int, operand_changes=()) -> float:
    """A chain of sums in mixed precision, as path_atol bounds one in fp32 (the float32 sums are the same
    on both sides: their 16-bit operands are), plus, for each product operand that rounded differently on
    the two sides (rounded_change: one 16-bit ulp, at most 2 U16 relative, where a boundary lay between its
    float32 values), that relative change of the product's terms carried to the output at the path's gain
    of 1, as path_atol carries every sum's error: operand_changes times the output's size."""
    size = float(numpy.abs(numpy.asarray(want, "float64")).max(initial=0.0))
    return path_atol(want, length) + float(sum(operand_changes)) * size
