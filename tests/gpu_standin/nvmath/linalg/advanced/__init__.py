"""nvmath.linalg.advanced.Matmul and MatmulEpilog, as nvmath-python 1.0 documents them:

- Matmul(a, b) computes D = a @ b for a (M, K) and b (K, N) of one dtype; plan(epilog=...,
  epilog_inputs=...) fixes the epilogue, execute() returns a new D each call, reset_operands(...)
  swaps in operands of the planned shapes and dtypes.
- The BIAS epilogues need epilog_inputs {"bias": vector}, of shape (M,) or (M, 1): one entry per
  row of D, added to every column; they produce a column-major D (cuBLASLt's requirement). Other
  epilogues give D in a's layout.
"""
from __future__ import annotations

import enum

import cupy


class MatmulEpilog(enum.IntEnum):
    DEFAULT = 1
    RELU = 2
    BIAS = 4
    RELU_BIAS = 6
    GELU = 32
    GELU_BIAS = 36


_BIAS = {MatmulEpilog.BIAS, MatmulEpilog.RELU_BIAS, MatmulEpilog.GELU_BIAS}


class Matmul:
    def __init__(self, a, b, c=None, *, alpha=None, beta=None, qualifiers=None, options=None, stream=None):
        if c is not None or alpha is not None or beta is not None:
            raise NotImplementedError("the stand-in computes a @ b only")
        self._a, self._b = self._checked(a, b)
        self._epilog, self._bias = None, None

    @staticmethod
    def _checked(a, b):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"The 'K' extent must match for the operands: a {a.shape}, b {b.shape}.")
        if a.dtype != b.dtype:
            raise ValueError(f"The dtype of operands a {a.dtype} and b {b.dtype} must be the same.")
        return a, b

    def plan(self, *, preferences=None, algorithms=None, epilog=None, epilog_inputs=None, stream=None):
        epilog = MatmulEpilog(epilog) if epilog is not None else None
        names = {"bias"} if epilog in _BIAS else set()
        if names != set(epilog_inputs or {}):
            raise ValueError(f"The epilog {epilog} requires the following input tensors: {names}. The provided "
                             f"tensor names are: {set(epilog_inputs or {})}")
        self._epilog = epilog
        self._bias = self._checked_bias((epilog_inputs or {}).get("bias"))
        return []

    def _checked_bias(self, bias):
        if bias is None:
            return None
        m = self._a.shape[0]
        if bias.shape not in ((m,), (m, 1)):
            raise ValueError(f"The M dimension of the bias vector ({bias.shape[0]}) must match the M dimension of A "
                             f"({m}), and its N dimension be 1.")
        return bias.reshape(m)

    def reset_operands(self, a=None, b=None, c=None, *, alpha=None, beta=None, epilog_inputs=None, stream=None):
        for name, new, old in (("a", a, self._a), ("b", b, self._b)):
            if new is not None and (new.shape != old.shape or new.strides != old.strides or new.dtype != old.dtype):
                raise ValueError(f"The new operand {name} must match the planned one in shape, strides and dtype: "
                                 f"{new.shape} {new.strides} {new.dtype}, planned {old.shape} {old.strides} {old.dtype}")
        self._a = self._a if a is None else a
        self._b = self._b if b is None else b
        if epilog_inputs is not None:
            self._bias = self._checked_bias(epilog_inputs.get("bias"))

    def execute(self, *, algorithm=None, release_workspace=False, stream=None):
        d_t = cupy.matmul(self._b.T, self._a.T)  # D^T (N, M), row-major: D's column-major memory
        if self._bias is not None:
            d_t += self._bias.reshape(1, -1)
        if self._epilog in (MatmulEpilog.RELU, MatmulEpilog.RELU_BIAS):
            cupy.maximum(d_t, 0, out=d_t)
        if self._epilog in (MatmulEpilog.GELU, MatmulEpilog.GELU_BIAS):
            raise NotImplementedError("the stand-in has no GELU epilogue (cuBLASLt's is the tanh approximation)")
        if self._epilog in _BIAS:
            return d_t.T  # column-major, as cuBLASLt's bias epilogues require
        return cupy.ascontiguousarray(d_t.T) if self._a.flags.c_contiguous else d_t.T

    def free(self):
        pass
