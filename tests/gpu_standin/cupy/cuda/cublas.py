"""cupy.cuda.cublas (cupy_backends.cuda.libs.cublas) for the stand-in: gemmEx, as CuPy 14 binds
cublasGemmEx, with its column-major semantics and the constants gpunet passes.

gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
computeType, algo) computes C (m x n, column-major, leading dimension ldc) = alpha op(A) op(B) +
beta C, where op(X) is X or X^T (CUBLAS_OP_N, CUBLAS_OP_T) of the column-major matrix at X's device
address; alpha and beta are host addresses of scalars of the compute type's scale type (float for
CUBLAS_COMPUTE_32F: cuBLAS's default pointer mode is the host). Here the 16-bit inputs are
multiplied exactly and summed in float64, then rounded to float32 once (a tensor core sums in
float32: at least as accurate as the GPU, within the same float32 bound).

Stricter than cuBLAS, and said so: a leading dimension smaller than the rows, a type combination
other than those gpunet's products use (16F x 16F -> 32F or 16BF x 16BF -> 32F, compute 32F), or an
operand range that no live device allocation holds raises CUBLASError (a GPU would read or write
another array's memory, or fault). Like a kernel, a call inside a stream capture runs nothing and is
recorded for the graph's replays; each call counts as one launch.
"""
from __future__ import annotations

import ctypes

import numpy

import cupy._ndarray as device_memory
from cupy.cuda import memory, runtime

CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1

_TYPES = {runtime.CUDA_R_16F: "float16", runtime.CUDA_R_16BF: "bfloat16", runtime.CUDA_R_32F: "float32"}


class CUBLASError(RuntimeError):
    pass


def _dtype(code: int) -> numpy.dtype:
    if _TYPES.get(code) == "bfloat16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(_TYPES[code])


def _matrix(ptr: int, dtype: numpy.dtype, rows: int, cols: int, ld: int, what: str) -> numpy.ndarray:
    """The column-major rows x cols matrix with leading dimension ld at device address ptr (a view)."""
    if ld < max(1, rows):
        raise CUBLASError(f"CUBLAS_STATUS_INVALID_VALUE: ld{what} {ld} < {rows} rows")
    nbytes = ((cols - 1) * ld + rows) * dtype.itemsize
    if not memory.holding(ptr, nbytes):
        raise CUBLASError(f"the stand-in's cuBLAS: {what} ({rows} x {cols}, ld {ld}, {dtype}) at {ptr:#x} is not inside "
                          f"one live device allocation (a GPU would read or write memory that is not this operand's)")
    flat = numpy.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype)
    return numpy.lib.stride_tricks.as_strided(flat, (rows, cols), (dtype.itemsize, ld * dtype.itemsize))


def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType,
           algo):
    if (Atype, Btype, Ctype) not in ((runtime.CUDA_R_16F,) * 2 + (runtime.CUDA_R_32F,),
                                     (runtime.CUDA_R_16BF,) * 2 + (runtime.CUDA_R_32F,)):
        raise CUBLASError(f"the stand-in's cublasGemmEx takes 16F x 16F or 16BF x 16BF into 32F; got types {Atype}, "
                          f"{Btype}, {Ctype}")
    if computeType != CUBLAS_COMPUTE_32F or transa not in (CUBLAS_OP_N, CUBLAS_OP_T) or \
            transb not in (CUBLAS_OP_N, CUBLAS_OP_T) or min(m, n, k) < 0:
        raise CUBLASError(f"CUBLAS_STATUS_INVALID_VALUE: computeType {computeType}, trans {transa} {transb}, "
                          f"m n k {m} {n} {k}")
    if not handle:
        raise CUBLASError("CUBLAS_STATUS_NOT_INITIALIZED: no handle")

    def run():
        a = _matrix(A, _dtype(Atype), *((m, k) if transa == CUBLAS_OP_N else (k, m)), lda, "A")
        b = _matrix(B, _dtype(Btype), *((k, n) if transb == CUBLAS_OP_N else (n, k)), ldb, "B")
        c = _matrix(C, _dtype(Ctype), m, n, ldc, "C")
        scale = [numpy.frombuffer((ctypes.c_char * 4).from_address(p), dtype=numpy.float32)[0] for p in (alpha, beta)]
        a = a if transa == CUBLAS_OP_N else a.T
        b = b if transb == CUBLAS_OP_N else b.T
        product = a.astype(numpy.float64) @ b.astype(numpy.float64)
        result = scale[0] * product + (scale[1] * c.astype(numpy.float64) if scale[1] != 0 else 0.0)
        c[...] = result.astype(numpy.float32)  # (beta = 0: C is not read, as cuBLAS promises)

    if device_memory.CAPTURING is None:
        run()
    device_memory.count("launches")
    device_memory.record(run)
