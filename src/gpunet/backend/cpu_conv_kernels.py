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


@functools.cache
def kernels() -> ConvKernels:
    import numba

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

    return ConvKernels(im2col_t, col2im_t, max_pool, max_pool_backward)
