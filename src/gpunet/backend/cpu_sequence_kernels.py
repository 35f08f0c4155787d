"""Numba kernels of the sequence layers and the normalisations on the CPU, compiled on first use and
cached on disk: the LSTM cell (one fused pass per time step instead of a dozen NumPy passes), the
embedding gradient (a scatter-add, 100x faster than numpy.add.at), layer and batch norm (one pass
for the statistics, one for the output, float64 accumulators).

tanh and sigmoid are Eigen's float32 rational approximation of tanh (within 3e-7 of the exact
value): unlike math.tanh it has no branches or library calls, so LLVM vectorises the loops.
error_model="numpy" drops the division-by-zero checks that would stop vectorisation.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy


class SequenceKernels(NamedTuple):
    lstm_cell: Callable  # (x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out)
    lstm_cell_backward: Callable  # (dh, dc, acts, c_prev, tanh_c, dgates): dc becomes d c_prev
    embedding_backward: Callable  # (ids, dy, grad): grad = the scatter-add of dy's rows at ids
    layer_norm: Callable  # (x, weight, bias, affine, eps, y, xhat, rstd) over the rows of 2-D x
    layer_norm_backward: Callable  # (dy, xhat, rstd, weight, affine, dx, dweight, dbias)
    batch_norm: Callable  # (x, mean, var, weight, bias, affine, training, eps, y, xhat, rstd) over (N, C, L) x
    batch_norm_backward: Callable  # (dy, xhat, rstd, weight, affine, training, dx, dweight, dbias)


f32 = numpy.float32


def _tanh32_body(a):
    x = min(max(a, f32(-7.90531110763549805)), f32(7.90531110763549805))
    x2 = x * x
    p = x2 * f32(-2.76076847742355e-16) + f32(2.00018790482477e-13)
    p = x2 * p + f32(-8.60467152213735e-11)
    p = x2 * p + f32(5.12229709037114e-08)
    p = x2 * p + f32(1.48572235717979e-05)
    p = x2 * p + f32(6.37261928875436e-04)
    p = x2 * p + f32(4.89352455891786e-03)
    q = x2 * f32(1.19825839466702e-06) + f32(1.18534705686654e-04)
    q = x2 * q + f32(2.26843463243900e-03)
    q = x2 * q + f32(4.89352518554385e-03)
    return x * p / q


def _sigmoid32_body(x):
    return f32(0.5) + f32(0.5) * tanh32(f32(0.5) * x)


# The bodies above, jitted by kernels(): the kernels call them as module globals, since a kernel
# calling a jitted closure misses Numba's disk cache in every new process (its key pickles the closure).
tanh32 = sigmoid32 = None


@functools.cache
def kernels() -> SequenceKernels:
    from gpunet.backend.cpu_kernels import numba_module

    numba = numba_module()  # NUMBA_NUM_THREADS checked first

    global tanh32, sigmoid32
    tanh32 = numba.njit(cache=True, inline="always")(_tanh32_body)
    sigmoid32 = numba.njit(cache=True, inline="always")(_sigmoid32_body)
    options = dict(cache=True, fastmath=True, error_model="numpy")

    @numba.njit(**options)
    def lstm_cell(x_gates, h_gates, c_prev, acts_out, h_out, c_out, tanh_c_out):
        # Short loops with few stores each: LLVM gives up vectorising a loop that writes many arrays.
        batch, hidden = c_prev.shape
        for b in range(batch):
            xg, hg, a = x_gates[b], h_gates[b], acts_out[b]
            for j in range(2 * hidden):  # i, f
                a[j] = sigmoid32(xg[j] + hg[j])
            g, o = 2 * hidden, 3 * hidden
            for j in range(hidden):
                a[g + j] = tanh32(xg[g + j] + hg[g + j])
            for j in range(hidden):
                a[o + j] = sigmoid32(xg[o + j] + hg[o + j])
            cp, co, tc, ho = c_prev[b], c_out[b], tanh_c_out[b], h_out[b]
            for j in range(hidden):
                c = a[hidden + j] * cp[j] + a[j] * a[g + j]
                t = tanh32(c)
                co[j] = c
                tc[j] = t
                ho[j] = a[o + j] * t

    @numba.njit(**options)
    def lstm_cell_backward(dh, dc, acts, c_prev, tanh_c, dgates):
        batch, hidden = c_prev.shape
        f, g, o = hidden, 2 * hidden, 3 * hidden
        for b in range(batch):
            a, d, dhb, dcb, t, cp = acts[b], dgates[b], dh[b], dc[b], tanh_c[b], c_prev[b]
            for j in range(hidden):
                dcb[j] += dhb[j] * a[o + j] * (f32(1) - t[j] * t[j])
                d[o + j] = dhb[j] * t[j] * a[o + j] * (f32(1) - a[o + j])
            for j in range(hidden):
                d[j] = dcb[j] * a[g + j] * a[j] * (f32(1) - a[j])
                d[f + j] = dcb[j] * cp[j] * a[f + j] * (f32(1) - a[f + j])
            for j in range(hidden):
                d[g + j] = dcb[j] * a[j] * (f32(1) - a[g + j] * a[g + j])
                dcb[j] *= a[f + j]

    @numba.njit(cache=True)
    def embedding_backward(ids, dy, grad):
        grad[...] = 0
        for r in range(ids.size):
            src, dst = dy[r], grad[ids[r]]
            for j in range(dst.size):
                dst[j] += src[j]

    # Layer norm one row at a time while it sits in L1 (statistics, then xhat and y in one pass),
    # instead of NumPy's seven passes over the whole array; sums in float64 (reassoc: vectorised).
    norm_options = dict(cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")

    @numba.njit(**norm_options)
    def layer_norm(x, weight, bias, affine, eps, y, xhat, rstd):
        rows, d = x.shape
        for r in range(rows):
            row = x[r]
            total = 0.0
            for j in range(d):
                total += row[j]
            mean = total / d
            sq = 0.0
            for j in range(d):
                c = row[j] - mean
                sq += c * c
            inv = 1.0 / numpy.sqrt(sq / d + eps)
            rstd[r] = inv
            xr, yr = xhat[r], y[r]
            m, s = x.dtype.type(mean), x.dtype.type(inv)
            for j in range(d):
                v = (row[j] - m) * s
                xr[j] = v
                yr[j] = v * weight[j] + bias[j] if affine else v

    # dx = rstd (g - mean(g) - xhat mean(g xhat)) for g = dy * weight, and the parameter gradients
    # summed over the rows (float64 accumulators, one pass).
    @numba.njit(**norm_options)
    def layer_norm_backward(dy, xhat, rstd, weight, affine, dx, dweight, dbias):
        rows, d = dy.shape
        acc_w = numpy.zeros(d)
        acc_b = numpy.zeros(d)
        for r in range(rows):
            dr, xr, out = dy[r], xhat[r], dx[r]
            sum_g = 0.0
            sum_gx = 0.0
            for j in range(d):
                g = dr[j] * weight[j] if affine else dr[j]
                sum_g += g
                sum_gx += g * xr[j]
                if affine:
                    acc_w[j] += dr[j] * xr[j]
                    acc_b[j] += dr[j]
            mean_g, mean_gx = dy.dtype.type(sum_g / d), dy.dtype.type(sum_gx / d)
            s = dy.dtype.type(rstd[r])
            for j in range(d):
                g = dr[j] * weight[j] if affine else dr[j]
                out[j] = s * (g - mean_g - xr[j] * mean_gx)
        if affine:
            for j in range(d):
                dweight[j] = acc_w[j]
                dbias[j] = acc_b[j]

    # Batch norm over the (N, L) of each channel of x (N, C, L): training, the batch's mean and biased variance
    # written into mean and var (float64 sums); else those given (the running statistics). rstd per channel.
    @numba.njit(**norm_options)
    def batch_norm(x, mean, var, weight, bias, affine, training, eps, y, xhat, rstd):
        n, c, length = x.shape
        count = n * length
        for ch in range(c):
            if training:
                total = 0.0
                for b in range(n):
                    for j in range(length):
                        total += x[b, ch, j]
                centre = total / count
                sq = 0.0
                for b in range(n):
                    for j in range(length):
                        d = x[b, ch, j] - centre
                        sq += d * d
                mean[ch], var[ch] = centre, sq / count
            inv = x.dtype.type(1.0 / numpy.sqrt(var[ch] + eps))
            rstd[ch] = inv
            m = x.dtype.type(mean[ch])
            for b in range(n):
                for j in range(length):
                    v = (x[b, ch, j] - m) * inv
                    xhat[b, ch, j] = v
                    y[b, ch, j] = v * weight[ch] + bias[ch] if affine else v

    # dx = rstd (g - mean(g) - xhat mean(g xhat)) for g = dy * weight (training; else g rstd), and the
    # parameters' gradients, per channel (float64 sums).
    @numba.njit(**norm_options)
    def batch_norm_backward(dy, xhat, rstd, weight, affine, training, dx, dweight, dbias):
        n, c, length = dy.shape
        count = n * length
        for ch in range(c):
            sum_dy = 0.0
            sum_dyx = 0.0
            for b in range(n):
                for j in range(length):
                    sum_dy += dy[b, ch, j]
                    sum_dyx += dy[b, ch, j] * xhat[b, ch, j]
            if affine:
                dweight[ch], dbias[ch] = sum_dyx, sum_dy
            w = weight[ch] if affine else dy.dtype.type(1.0)
            s = rstd[ch]
            mean_g, mean_gx = dy.dtype.type(w * sum_dy / count), dy.dtype.type(w * sum_dyx / count)
            for b in range(n):
                for j in range(length):
                    g = dy[b, ch, j] * w
                    dx[b, ch, j] = s * (g - mean_g - xhat[b, ch, j] * mean_gx) if training else g * s

    return SequenceKernels(lstm_cell, lstm_cell_backward, embedding_backward, layer_norm, layer_norm_backward,
                           batch_norm, batch_norm_backward)
