"""CPU backend: NumPy (OpenBLAS for GEMM) with Numba kernels where NumPy is slow."""
from __future__ import annotations

import numpy

from gpunet.backend import cpu_kernels
from gpunet.backend.ops import Ops


class NumpyOps(Ops):
    name = "cpu"
    xp = numpy

    def erf(self, x):
        return cpu_kernels.erf(x)
