"""The GPU's mixed-precision Dense products (CupyGemmPaths.product16): gpunet's 16-bit GEMM
(kernels/gemm16.cu) and its tensor-core version (gemm16_tc, nvcuda::wmma), cuBLAS's cublasGemmEx on the 16-bit operands and cuBLAS's float32 GEMM of their
values, each forced in turn, forward and backward,
against the reference Ops in the same precision (NumPy: the operands rounded to 16 bits, float32
products), within the float32 bounds of those rounded operands: both sides multiply the same
16-bit values exactly and differ only in the order of their float32 sums."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.backend import ops_for_device, precision
from gpunet.backend.ops import Ops, is_16bit
from tests.support.arrays import on, rng
from tests.support.tolerance import assert_within, linear_atol, linear_backward_atol, round16

REFERENCE = Ops()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["fused", "wmma", "cublas", "gemmex"])
def test_each_16bit_path_forward_and_backward_against_the_cpu(monkeypatch, mode, kind):
    ops = ops_for_device("gpu")
    monkeypatch.setattr(ops, "gemm_mode", mode)
    m, k, n = 130, 77, 203  # several tiles each way, ragged edges
    r = rng(m + k + n)
    x, w, b, dy = (r.standard_normal(s).astype("float32") for s in ((m, k), (n, k), (n,), (m, n)))
    xr, wr, dyr = (round16(a, kind).astype("float32") for a in (x, w, dy))
    with precision.using(kind):
        for activation in (None, "relu", "gelu"):
            got = gn.to_numpy(ops.linear(on("gpu", x), on("gpu", w), on("gpu", b), activation))
            assert_within(got, REFERENCE.linear(xr, wr, b, activation), linear_atol(xr, wr, b, activation),
                          f"{mode} {kind} {activation}")
        z = REFERENCE.linear(xr, wr, b)
        y = numpy.maximum(z, 0)
        for activation, x_kept in ((None, on("gpu", x)), ("relu", ops.store_16bit(on("gpu", x)))):
            assert is_16bit(x_kept) == (activation == "relu")  # (the backward also takes the forward's 16-bit copy)
            grads = [on("gpu", numpy.full((n, k), numpy.nan, "float32")), on("gpu", numpy.zeros(n, "float32"))]
            dx = ops.linear_act_backward(x_kept, on("gpu", w), on("gpu", z), on("gpu", y), on("gpu", dy), activation,
                                         *grads)
            dz = dyr * (z > 0) if activation else dyr  # (ReLU's derivative is a select: exact on both sides)
            want_dx, want_dw = dz.astype("float64") @ wr, dz.T.astype("float64") @ xr
            dx_atol, dw_atol, _ = linear_backward_atol(xr, wr, dz, numpy.zeros_like(dz))
            assert_within(gn.to_numpy(dx), want_dx, dx_atol, f"{mode} {kind} {activation} dx")
            assert_within(gn.to_numpy(grads[0]), want_dw, dw_atol, f"{mode} {kind} {activation} dW")
            db = dy * (z > 0) if activation else dy  # (the bias gradient sums dz itself, in float32, not rounded)
            assert_within(gn.to_numpy(grads[1]), db.sum(axis=0, dtype="float64"),
                          linear_backward_atol(xr, wr, db, numpy.zeros_like(db))[2], f"{mode} {kind} db")


@pytest.mark.gpu
def test_the_16bit_gemm_refuses_operands_it_cannot_read():
    from gpunet.backend import cuda_precision
    ops = ops_for_device("gpu")
    with precision.using("bf16"):
        a, = ops.gemm_operands16(on("gpu", numpy.ones((4, 3), "float32")))
    with pytest.raises(TypeError, match=r"gemm16 takes two 16-bit operands of one dtype.*float32"):
        cuda_precision.gemm16(a, on("gpu", numpy.ones((5, 3), "float32")), None, None)
    with precision.using("fp16"):
        h, = ops.gemm_operands16(on("gpu", numpy.ones((5, 3), "float32")))
    with pytest.raises(TypeError, match=r"one dtype.*bfloat16.*float16"):
        cuda_precision.gemm16(a, h, None, None)


@pytest.mark.gpu
def test_the_standin_cublas_refuses_a_range_no_allocation_holds():
    """The stand-in's cublasGemmEx reads operands by raw device address, as cuBLAS does: a leading dimension
    that reaches past the array is refused (a GPU would read another array's memory)."""
    import cupy

    with precision.using("bf16"):
        a, w = ops_for_device("gpu").gemm_operands16(on("gpu", numpy.ones((4, 3), "float32")),
                                                      on("gpu", numpy.ones((5, 3), "float32")))
    y = cupy.empty((4, 5), dtype="float32")
    one, zero = numpy.ones(1, numpy.float32), numpy.zeros(1, numpy.float32)
    cublas, runtime = cupy.cuda.cublas, cupy.cuda.runtime
    bf16 = runtime.CUDA_R_16BF
    cublas.gemmEx(cupy.cuda.get_cublas_handle(), cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, 5, 4, 3, one.ctypes.data,
                  w.data.ptr, bf16, 3, a.data.ptr, bf16, 3, zero.ctypes.data, y.data.ptr, runtime.CUDA_R_32F, 5,
                  cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    assert numpy.array_equal(gn.to_numpy(y), numpy.full((4, 5), 3.0, "float32"))
    with pytest.raises(cublas.CUBLASError, match="not inside one live device allocation"):
        cublas.gemmEx(cupy.cuda.get_cublas_handle(), cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, 5, 4, 3, one.ctypes.data,
                      w.data.ptr, bf16, 4, a.data.ptr, bf16, 3, zero.ctypes.data, y.data.ptr, runtime.CUDA_R_32F, 5,
                      cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
