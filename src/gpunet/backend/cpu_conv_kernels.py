"""Numba kernels for convolution and pooling on the CPU (single-threaded: OpenBLAS owns the cores).

Layouts match Ops: im2col rows are output pixels in (n, oh, ow) order, columns (c, i, j).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple


class ConvKernels(NamedTuple):
    im2col_t: Callable  # (x, kh, kw, sh, sw, ph, pw, oh, ow, cols_t): the columns, transposed
    col2im_t: Callable  # (cols_t, kh, kw, sh, sw, ph, pw, oh, ow, out): their sum back into out
    max_pool: Callable  # (x, kh, kw, sh, sw, y, arg)
    max_pool_backward: Callable  # (dy, arg, kw, sh, sw, dx)
    bias_relu_pool_t: Callable  # (y_t, bias, has_bias, kh, kw, pitch, pooled, arg)
    relu_pool_backward_t: Callable  # (dp, pooled, arg, kh, kw, oh, pitch, dy_t, grad_bias, has_bias)
    col2im_rows: Callable  # (dcols, kh, kw, wp, oh, planes): the wide-row columns summed into padded planes


@functools.cache
def kernels() -> ConvKernels:
    from gpunet.backend.cpu_kernels import numba_module

    numba = numba_module()  # NUMBA_NUM_THREADS checked first

    # Columns are written transposed, (c*kh*kw, n*oh*ow): the inner loop then runs along an
    # output row, contiguous in memory on both sides. Callers see cols_t.T, the (n*oh*ow, c*kh*kw)
    # matrix of Ops.im2col in Fortran order, which BLAS takes without a copy.
    @numba.njit(cache=True)
    def im2col_t(x, kh, kw, sh, sw, ph, pw, oh, ow, cols_t):
        n, c, h, w = x.shape
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    k = (ch * kh + i) * kw + j
                    for b in range(n):
                        for y in range(oh):
                            r = y * sh - ph + i
                            base = (b * oh + y) * ow
                            if r < 0 or r >= h:
                                cols_t[k, base : base + ow] = 0
                                continue
                            for z in range(ow):
                                s = z * sw - pw + j
                                cols_t[k, base + z] = x[b, ch, r, s] if 0 <= s < w else 0

    @numba.njit(cache=True)
    def col2im_t(cols_t, kh, kw, sh, sw, ph, pw, oh, ow, out):
        n, c, h, w = out.shape
        out[...] = 0
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    k = (ch * kh + i) * kw + j
                    for b in range(n):
                        for y in range(oh):
                            r = y * sh - ph + i
                            if r < 0 or r >= h:
                                continue
                            base = (b * oh + y) * ow
                            for z in range(ow):
                                s = z * sw - pw + j
                                if 0 <= s < w:
                                    out[b, ch, r, s] += cols_t[k, base + z]

    @numba.njit(cache=True)
    def max_pool(x, kh, kw, sh, sw, y, arg):
        n, c, oh, ow = y.shape
        for b in range(n):
            for ch in range(c):
                for p in range(oh):
                    for q in range(ow):
                        best = x[b, ch, p * sh, q * sw]
                        where = 0
                        for i in range(kh):
                            for j in range(kw):
                                v = x[b, ch, p * sh + i, q * sw + j]
                                if v > best:  # strict: ties keep the first maximum, as torch
                                    best, where = v, i * kw + j
                        y[b, ch, p, q] = best
                        arg[b, ch, p, q] = where

    @numba.njit(cache=True)
    def max_pool_backward(dy, arg, kw, sh, sw, dx):
        n, c, oh, ow = dy.shape
        dx[...] = 0
        for b in range(n):
            for ch in range(c):
                for p in range(oh):
                    for q in range(ow):
                        k = arg[b, ch, p, q]
                        dx[b, ch, p * sh + k // kw, q * sw + k % kw] += dy[b, ch, p, q]

    # The adjoint of NumpyOps' wide-row im2col: column k = (ch, i, j) of image b is the run of
    # oh * wp values that starts at i * wp + j in that image's padded plane of channel ch.
    @numba.njit(cache=True)
    def col2im_rows(dcols, kh, kw, wp, oh, planes):
        n, c = planes.shape[:2]
        run = oh * wp
        planes[...] = 0
        for b in range(n):
            for ch in range(c):
                dst = planes[b, ch]
                for i in range(kh):
                    for j in range(kw):
                        src = dcols[(ch * kh + i) * kw + j, b * run: (b + 1) * run]
                        into = dst[i * wp + j: i * wp + j + run]  # a slice: LLVM then vectorises the add (5x)
                        for t in range(run):
                            into[t] += src[t]

    # LeNet's Conv2D + ReLU + MaxPool2D (windows that do not overlap) straight from the GEMM's
    # channel-major product y_t (C, N, oh * pitch), rows pitch apart (ow, or wp for wide rows):
    # bias, ReLU and the window's maximum in one read of it, instead of an NCHW copy with the
    # bias, a ReLU pass and a pooling pass. relu(z + b) is pooled, as torch pools it; ties keep
    # the first maximum (a strict >), as torch.
    @numba.njit(cache=True)
    def bias_relu_pool_t(y_t, bias, has_bias, kh, kw, pitch, pooled, arg):
        n, c, ph, pw = pooled.shape
        zero = pooled.dtype.type(0)
        for plane in range(n * c):
            b, ch = plane // c, plane % c
            src = y_t[ch, b]
            shift = bias[ch] if has_bias else zero
            for p in range(ph):
                out, at = pooled[b, ch, p], arg[b, ch, p]
                if kh == 2 and kw == 2:  # LeNet's windows written out, in registers: 2.8x the loops below
                    top, bottom = src[2 * p * pitch:], src[(2 * p + 1) * pitch:]
                    for q in range(pw):
                        best, where = max(top[2 * q] + shift, zero), 0
                        v = max(top[2 * q + 1] + shift, zero)
                        if v > best:
                            best, where = v, 1
                        v = max(bottom[2 * q] + shift, zero)
                        if v > best:
                            best, where = v, 2
                        v = max(bottom[2 * q + 1] + shift, zero)
                        if v > best:
                            best, where = v, 3
                        out[q], at[q] = best, where
                    continue
                for q in range(pw):
                    base = p * kh * pitch + q * kw
                    best, where = max(src[base] + shift, zero), 0
                    for i in range(kh):
                        for j in range(kw):
                            v = max(src[base + i * pitch + j] + shift, zero)
                            if v > best:
                                best, where = v, i * kw + j
                    out[q], at[q] = best, where

    # Its backward: each window's gradient goes to its maximum where that was positive (relu' at
    # the maximum), written channel-major (C, N*oh*pitch) as the weight and input GEMMs read it, with
    # the bias gradient summed on the way (in float64).
    @numba.njit(cache=True)
    def relu_pool_backward_t(dp, pooled, arg, kh, kw, oh, pitch, dy_t, grad_bias, has_bias):
        n, c, ph, pw = dp.shape
        length = oh * pitch
        for ch in range(c):
            total = 0.0
            for b in range(n):
                dst = dy_t[ch, b * length: (b + 1) * length]
                dst[:] = 0
                for p in range(ph):
                    for q in range(pw):
                        if pooled[b, ch, p, q] > 0:
                            g = dp[b, ch, p, q]
                            k = arg[b, ch, p, q]
                            dst[(p * kh + k // kw) * pitch + q * kw + k % kw] = g
                            total += g
            if has_bias:
                grad_bias[ch] = total

    return ConvKernels(im2col_t, col2im_t, max_pool, max_pool_backward, bias_relu_pool_t, relu_pool_backward_t,
                       col2im_rows)
