"""CPU backend: NumPy (OpenBLAS for GEMM) with Numba kernels where NumPy is slow."""
from __future__ import annotations

import math

import numpy

from gpunet.backend import cpu_kernels
from gpunet.backend.ops import Ops


class NumpyOps(Ops):
    name = "cpu"
    xp = numpy

    def erf(self, x):
        return cpu_kernels.erf(x)

    def sgd_update(self, param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step):
        if not _fusable(param, grad, velocity):
            return super().sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step)
        cpu_kernels.sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step)

    def adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step):
        if not _fusable(param, grad, exp_avg, exp_avg_sq):
            return super().adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay,
                                       decoupled, step)
        cpu_kernels.adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled,
                                1 - beta1**step, math.sqrt(1 - beta2**step))


def _fusable(*arrays) -> bool:
    """The Numba kernels take contiguous float arrays of one dtype (None for an unused slot)."""
    dtypes = {a.dtype for a in arrays if a is not None}
    return (len(dtypes) == 1 and dtypes.pop().kind == "f"
            and all(a.flags.c_contiguous for a in arrays if a is not None))
