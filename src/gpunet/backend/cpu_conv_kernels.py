"""Numba kernels for convolution and pooling on the CPU (single-threaded: OpenBLAS owns the cores).

Layouts match Ops: im2col rows are output pixels in (n, oh, ow) order, columns (c, i, j).
"""
from __future__ import annotations

import functools


@functools.cache
def kernels():
    import numba

    @numba.njit(cache=True)
    def im2col(x, kh, kw, sh, sw, ph, pw, oh, ow, cols):
        n, c, h, w = x.shape
        for b in range(n):
            for y in range(oh):
                for z in range(ow):
                    row = (b * oh + y) * ow + z
                    col = 0
                    for ch in range(c):
                        for i in range(kh):
                            r = y * sh - ph + i
                            for j in range(kw):
                                s = z * sw - pw + j
                                if 0 <= r < h and 0 <= s < w:
                                    cols[row, col] = x[b, ch, r, s]
                                else:
                                    cols[row, col] = 0
                                col += 1

    @numba.njit(cache=True)
    def col2im(cols, kh, kw, sh, sw, ph, pw, oh, ow, out):
        n, c, h, w = out.shape
        out[...] = 0
        for b in range(n):
            for y in range(oh):
                for z in range(ow):
                    row = (b * oh + y) * ow + z
                    col = 0
                    for ch in range(c):
                        for i in range(kh):
                            r = y * sh - ph + i
                            for j in range(kw):
                                s = z * sw - pw + j
                                if 0 <= r < h and 0 <= s < w:
                                    out[b, ch, r, s] += cols[row, col]
                                col += 1

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

    return im2col, col2im, max_pool, max_pool_backward
