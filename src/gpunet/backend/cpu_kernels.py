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


@functools.cache
def _optimizer_kernels():
    import numba

    @numba.njit(cache=True)
    def sgd(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step):
        for i in range(param.size):
            g = grad[i] + weight_decay * param[i]
            if momentum != 0:
                v = g if first_step else momentum * velocity[i] + (1 - dampening) * g
                velocity[i] = v
                g = g + momentum * v if nesterov else v
            param[i] -= lr * g

    @numba.njit(cache=True)
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

    return sgd, adam


def sgd_update(param, grad, velocity, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """Fused SGD step over flat views; velocity may be None when momentum is 0."""
    sgd = _optimizer_kernels()[0]
    flat_v = velocity.reshape(-1) if velocity is not None else param.reshape(-1)[:0]
    sgd(param.reshape(-1), grad.reshape(-1), flat_v, *_scalars(param.dtype, lr, momentum, dampening, weight_decay),
        bool(nesterov), bool(first_step))


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2_sqrt):
    adam = _optimizer_kernels()[1]
    adam(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
         *_scalars(param.dtype, lr, beta1, beta2, eps, weight_decay), bool(decoupled),
         *_scalars(param.dtype, bias1, bias2_sqrt))


def _scalars(dtype, *values):
    return [dtype.type(v) for v in values]
