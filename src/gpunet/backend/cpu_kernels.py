"""Numba kernels for the CPU backend, compiled on first use and cached on disk."""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import numpy

from gpunet import validate


class ErfUfuncs(NamedTuple):
    erf32: Callable
    erf64: Callable
    gelu32: Callable  # (x) -> 0.5 x (1 + erf(x / sqrt 2))
    gelu_grad32: Callable  # (x, dy) -> dy * gelu'(x)


class SoftmaxKernels(NamedTuple):
    xent32: Callable  # (logits, labels, grad, losses): float32 softmax cross-entropy, both outputs in place
    attention32: Callable  # (scores (R, T, T), scale, causal): softmax(scale * scores), in place
    attention_backward32: Callable  # (probs, dprobs, scale): the scores' gradient, over dprobs


class OptimizerKernels(NamedTuple):
    sgd: Callable  # (param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step)
    adam: Callable  # (param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2_sqrt)


f32 = numpy.float32


def numba_module():
    """Numba, imported after NUMBA_NUM_THREADS is checked: every Numba kernel of gpunet starts here, so
    a bad value is one line naming the variable (Numba's own import fails without naming it)."""
    validate.numba_threads()
    import numba

    return numba


def _erf32_body(a):
    # Eigen's float32 erf: a rational function on [-4, 4] (erf is +-1 in float32 beyond),
    # within 4e-7 of math.erf. Unlike math.erf it has no branches, so LLVM vectorises it:
    # 35x faster, which is what GELU in a transformer needs.
    x = min(max(a, f32(-4.0)), f32(4.0))
    x2 = x * x
    p = x2 * f32(-2.72614225801306e-10) + f32(2.77068142495902e-08)
    p = x2 * p + f32(-2.10102402082508e-06)
    p = x2 * p + f32(-5.69250639462346e-05)
    p = x2 * p + f32(-7.34990630326855e-04)
    p = x2 * p + f32(-2.95459980854025e-03)
    p = x2 * p + f32(-1.60960333262415e-02)
    q = x2 * f32(-1.45660718464996e-05) + f32(-2.13374055278905e-04)
    q = x2 * q + f32(-1.68282697438203e-03)
    q = x2 * q + f32(-7.37332916720468e-03)
    q = x2 * q + f32(-1.42647390514189e-02)
    return x * p / q


def _exp_nonpositive32_body(x):
    # e^x for x <= 0, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r,
    # times 2^n built in the exponent bits. Within 1e-7 relative of exp, and unlike NumPy's exp
    # or math.exp it vectorises inside a Numba loop (4x NumPy's exp on this machine).
    small = x < f32(-87.0)  # e^-87 is 1.6e-38, a normal float32; below it 2^n would not be: 0
    x = max(x, f32(-87.0))
    n = numpy.floor(x * f32(1.4426950408889634) + f32(0.5))
    r = x - n * f32(0.693359375) - n * f32(-2.12194440e-4)  # ln2 in two parts: r exact
    p = f32(1.9875691500e-4)
    p = p * r + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    p = p * r * r + r + f32(1.0)
    e = p * numpy.int32((numpy.int32(n) + 127) << 23).view(numpy.float32)
    return f32(0.0) if small else e


# The two bodies above, jitted by _jit_scalars(). Kernels call them as module globals: a kernel
# calling a jitted closure would miss Numba's disk cache on every run (its key pickles the closure).
_erf32 = _exp_nonpositive32 = None


def _jit_scalars() -> None:
    global _erf32, _exp_nonpositive32
    if _erf32 is None:
        numba = numba_module()

        _erf32 = numba.njit(cache=True, inline="always")(_erf32_body)
        _exp_nonpositive32 = numba.njit(cache=True, inline="always")(_exp_nonpositive32_body)


@functools.cache
def _erf_ufuncs() -> ErfUfuncs:
    numba = numba_module()

    _jit_scalars()

    @numba.vectorize(["float32(float32)"], cache=True, fastmath=True)
    def erf32(a):
        return _erf32(a)

    @numba.vectorize(["float64(float64)"], cache=True)
    def erf64(x):
        return math.erf(x)

    # GELU (erf form) and its derivative in one pass each, not NumPy's five or eight.
    @numba.vectorize(["float32(float32)"], cache=True, fastmath=True)
    def gelu32(x):
        return f32(0.5) * x * (f32(1.0) + _erf32(x * f32(0.7071067811865476)))

    @numba.vectorize(["float32(float32, float32)"], cache=True, fastmath=True)
    def gelu_grad32(x, dy):
        cdf = f32(0.5) * (f32(1.0) + _erf32(x * f32(0.7071067811865476)))
        t = min(max(x, f32(-14.0)), f32(14.0))  # e^(-98) is 0 in float32 already; x * x could overflow
        pdf = _exp_nonpositive32(f32(-0.5) * t * t) * f32(0.3989422804014327)
        return dy * (cdf + x * pdf)

    return ErfUfuncs(erf32, erf64, gelu32, gelu_grad32)


def erf(x: numpy.ndarray) -> numpy.ndarray:
    ufuncs = _erf_ufuncs()
    return ufuncs.erf32(x) if x.dtype == numpy.float32 else ufuncs.erf64(x)


def gelu32(x: numpy.ndarray, out=None) -> numpy.ndarray:
    return _erf_ufuncs().gelu32(x) if out is None else _erf_ufuncs().gelu32(x, out)


def gelu_grad32(x: numpy.ndarray, dy: numpy.ndarray) -> numpy.ndarray:
    return _erf_ufuncs().gelu_grad32(x, dy)


@functools.cache
def _softmax_kernels() -> SoftmaxKernels:
    numba = numba_module()

    _jit_scalars()

    # One pass over each row while it sits in L1 (max, exp and sum, scale): the logits are read once
    # and the gradient written once. Flags: nnan vectorises the maximum, reassoc the sum; NaN is
    # caught by its bits instead, which no flag touches. Serial: a Numba thread pool spinning after
    # its loop took the cores from OpenBLAS's next GEMM (the MLP step at 2 threads: 2x slower).
    @numba.njit(cache=True, error_model="numpy", fastmath={"nnan", "nsz", "reassoc", "contract"})
    def xent32(logits, labels, grad, losses):
        n, c = logits.shape
        inv_n = f32(1.0) / f32(n)
        bits = logits.view(numpy.int32)
        for i in range(n):
            row, g = logits[i], grad[i]
            m = row[0]
            worst = numpy.int32(0)
            for j in range(c):
                m = max(m, row[j])
                worst = max(worst, bits[i, j] & numpy.int32(0x7FFFFFFF))
            if worst > numpy.int32(0x7F800000) or m == numpy.inf or m == -numpy.inf:  # NaN, +inf, all -inf
                g[:] = numpy.nan
                losses[i] = numpy.nan
                continue
            total = f32(0.0)
            for j in range(c):
                e = _exp_nonpositive32(row[j] - m)
                g[j] = e
                total += e
            scale = inv_n / total
            for j in range(c):
                g[j] *= scale
            label = labels[i]
            g[label] -= inv_n
            losses[i] = numpy.log(total) - (row[label] - m)

    # Attention's softmax a row at a time, as xent32 (one pass while the row sits in L1); a causal
    # row t computes keys 0..t only and writes exact zeros past them. Rows are indexed flat and the
    # scale applied to the maximum once: a 3-D index in the inner loop kept it scalar (1.8x slower).
    @numba.njit(cache=True, error_model="numpy", fastmath={"nnan", "nsz", "reassoc", "contract"})
    def attention32(scores, scale, causal):
        groups, t, keys = scores.shape
        rows = scores.reshape(groups * t, keys)
        bits = rows.view(numpy.int32)
        for q in range(groups * t):
            row, row_bits = rows[q], bits[q]
            seen = q % t + 1 if causal else keys
            m = row[0]
            worst = numpy.int32(0)
            for j in range(seen):
                m = max(m, row[j])
                worst = max(worst, row_bits[j] & numpy.int32(0x7FFFFFFF))
            m *= scale  # scale > 0: the maximum of the scaled row
            if worst > numpy.int32(0x7F800000) or m == numpy.inf or m == -numpy.inf:  # NaN in, NaN out
                row[:seen] = numpy.nan
                row[seen:] = 0
                continue
            total = f32(0.0)
            for j in range(seen):
                e = _exp_nonpositive32(row[j] * scale - m)
                row[j] = e
                total += e
            inv = f32(1.0) / total
            for j in range(seen):
                row[j] *= inv
            row[seen:] = 0

    @numba.njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
    def attention_backward32(probs, dprobs, scale):
        groups, t, keys = probs.shape
        for g in range(groups):
            for i in range(t):
                p, d = probs[g, i], dprobs[g, i]
                dot = f32(0.0)
                for j in range(keys):
                    dot += d[j] * p[j]
                for j in range(keys):
                    d[j] = (d[j] - dot) * p[j] * scale

    return SoftmaxKernels(xent32, attention32, attention_backward32)


def softmax_cross_entropy32(logits, labels):
    """(mean loss, gradient) of float32 (N, C) logits, N >= 1, and in-range int labels (N,)."""
    grad = numpy.empty_like(logits)
    losses = numpy.empty(logits.shape[0], dtype=numpy.float32)
    _softmax_kernels().xent32(logits, labels, grad, losses)
    return losses.mean(dtype=numpy.float32), grad


def attention_softmax32(scores, scale, causal):
    """softmax(scale * scores) over the last axis of contiguous float32 (..., T, T) scores, in place."""
    _softmax_kernels().attention32(scores.reshape(-1, *scores.shape[-2:]), numpy.float32(scale), bool(causal))
    return scores


def attention_softmax_backward32(probs, dprobs, scale):
    """The unscaled scores' gradient, written over contiguous float32 dprobs."""
    shape = (-1, *probs.shape[-2:])
    _softmax_kernels().attention_backward32(probs.reshape(shape), dprobs.reshape(shape), numpy.float32(scale))
    return dprobs


@functools.cache
def _optimizer_kernels() -> OptimizerKernels:
    numba = numba_module()

    # error_model="numpy": no division-by-zero checks, which would keep LLVM from vectorising.
    @numba.njit(cache=True, error_model="numpy")
    def sgd(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step):
        for i in range(param.size):
            g = grad[i] + weight_decay * param[i]
            if momentum != 0:
                v = g if first_step else momentum * velocity[i] + (1 - dampening) * g
                velocity[i] = v
                g = g + momentum * v if nesterov else v
            param[i] -= lr * g

    @numba.njit(cache=True, error_model="numpy")
    def adam(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2_sqrt):
        for i in range(param.size):
            p = param[i]
            g = grad[i]
            if decoupled:
                p *= 1 - lr * weight_decay
            else:
                g += weight_decay * p
            mi = beta1 * m[i] + (1 - beta1) * g
            vi = beta2 * v[i] + (1 - beta2) * g * g
            m[i] = mi
            v[i] = vi
            param[i] = p - (lr / bias1) * mi / (numpy.sqrt(vi) / bias2_sqrt + eps)

    return OptimizerKernels(sgd, adam)


def sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """Fused SGD step over flat views; velocity may be None when momentum is 0."""
    sgd = _optimizer_kernels().sgd
    flat_v = velocity.reshape(-1) if velocity is not None else param.reshape(-1)[:0]
    sgd(param.reshape(-1), grad.reshape(-1), flat_v, *_scalars(param.dtype, lr, momentum, dampening, weight_decay),
        bool(nesterov), bool(first_step))


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2_sqrt):
    adam = _optimizer_kernels().adam
    adam(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
         *_scalars(param.dtype, lr, beta1, beta2, eps, weight_decay), bool(decoupled),
         *_scalars(param.dtype, bias1, bias2_sqrt))


def _scalars(dtype, *values):
    return [dtype.type(v) for v in values]
