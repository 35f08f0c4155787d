"""Numba kernels for the CPU backend, compiled on first use and cached on disk."""
from __future__ import annotations

import functools
import math

import numpy


@functools.cache
def _erf_ufunc():
    import numba

    @numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)
    def erf(x):
        return math.erf(x)

    return erf


def erf(x: numpy.ndarray) -> numpy.ndarray:
    return _erf_ufunc()(x)
