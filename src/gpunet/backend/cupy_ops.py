"""GPU backend: CuPy (cuBLAS for plain GEMM) with gpunet's own kernels from kernels/*.cu."""
from __future__ import annotations

from gpunet.backend.devices import cupy_status
from gpunet.backend.ops import Ops


class CupyOps(Ops):
    name = "gpu"

    def __init__(self):
        cupy = cupy_status()[0]
        if cupy is None:
            raise RuntimeError(cupy_status()[1])
        self.xp = cupy

    def erf(self, x):
        from cupyx.scipy.special import erf

        return erf(x)
