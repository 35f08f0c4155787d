"""The ways CupyOps runs a Dense product with its epilogue, and the GEMM dispatch that picks one: a
mixin of CupyOps (cupy_ops.py), which reads self.xp, self._paths, self._paths16, self._lt, self._dispatch,
self.tf32 and self.gemm_mode. Also the backward epilogues that feed the products: a Dense layer's
(linear_backward16) and a convolution's (conv_bias_act_backward), whose dz is written in 16 bits in
mixed precision, the products' operand.

Each path takes (x, weight, bias, activation, out) and gives y, into out when given: gpunet's fused
kernel (kernels/gemm.cu), cuBLAS then one epilogue pass, or cuBLASLt's fused epilogue (cublaslt.py,
with nvmath-python).

In mixed precision (product16) every Dense product, forward and backward, has three paths: gpunet's
16-bit GEMM (kernels/gemm16.cu: the operands cast to 16 bits, half the bytes loaded, float32 products
and sums, the epilogue fused), cuBLAS's cublasGemmEx on the 16-bit operands (tensor cores, float32
compute and output; "gemmex"), and cuBLAS's float32 GEMM on their float32 values ("cublas"), each of
the last two with the epilogue after it. All multiply the same 16-bit values exactly and sum in float32
(TF32 mode changes nothing there: a 16-bit value is a TF32 value); the dispatch times them per size
class and precision, as in float32."""
from __future__ import annotations

import functools

import numpy

from gpunet.backend import activations, cublaslt, cuda_precision, precision
from gpunet.backend import cuda_wrappers as kernels
from gpunet.backend.cuda_kernels import compile_inputs
from gpunet.backend.devices import cupy_status, gpu_name
from gpunet.backend.conv_ops import pooled_size
from gpunet.backend.gemm_dispatch import GemmDispatch, agreeing, source_hash
from gpunet.backend.kernel_guard import float32_contiguous, kernel_or_fallback
from gpunet.backend.ops import sixteen_bit_dtype


class CupyGemmPaths:
    def _linear_paths(self, bias, activation) -> dict:
        """The ways to run a Dense product with its epilogue: each (x, weight, bias, activation, out) -> y,
        writing into out when given. Made once per kind of epilogue (a Dense forward asks every step)."""
        key = (bias is not None, activation)
        paths = self._paths.get(key)
        if paths is None:
            paths = self._paths[key] = {"fused": self._fused_linear, "cublas": self._cublas_linear}
            if self._lt is not None and cublaslt.handles(bias, activation):
                paths["cublaslt"] = self._lt
        return paths

    def _fused_linear(self, x, weight, bias, activation, out=None):
        """gpunet's GEMM with the bias and the activation in its epilogue."""
        y = out if out is not None else self.xp.empty((x.shape[0], weight.shape[0]), dtype="float32")
        kernels.gemm_bias_act(x, weight, bias, activation, y)
        return y

    def _cublas_linear(self, x, weight, bias, activation, out=None):
        """cuBLAS, then the bias and the activation in one pass."""
        y = self.xp.matmul(x, weight.T, out=out)
        kernels.bias_act_forward(y, bias, activation, y)
        return y

    def _gemm_dispatch(self):
        if self._dispatch is None:
            device = cupy_status()[0].cuda.Device()  # (CuPy itself: self.xp of the mixin reads as NumPy-or-CuPy)
            # the source and the -D constants, and whether cuBLASLt is a candidate: a choice made without it is
            # measured again once it is installed
            kernels_version = source_hash(*compile_inputs("gemm"), *compile_inputs("gemm16"),
                                          f"cublaslt={self._lt is not None}")
            self._dispatch = GemmDispatch(f"{gpu_name(device.id)} sm_{device.compute_capability}", kernels_version,
                                          measure=self._time_on_gpu, tf32=self.tf32)
        return self._dispatch

    def _time_on_gpu(self, fn, warmup: int = 2, repeats: int = 5) -> float:
        for _ in range(warmup):
            fn()
        cupy = cupy_status()[0]
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / repeats / 1e3

    def product16(self, a, w, bias=None, activation=None, out=None, what="dense"):
        """out (M, N) float32 = activation(a . w^T + bias) for 16-bit a (M, K) and w (N, K) of the running
        precision (gemm_operands16), in any layout (the backward's dz.T, x.T, weight.T are views: no copy; gemm16
        reads through strides, cuBLAS takes a transposed operand as it is). By the path the dispatch measured fastest for this size class,
        `what` (dense, dx, dw) and precision, or the one GPUNET_GEMM forces (cublaslt: the fused one here)."""
        paths = self._paths16 or self._make_paths16()
        args = (a, w, bias, activation)
        mode = self.gemm_mode
        if mode == "auto":
            epilogue = f"{what}:{activation or ('bias' if bias is not None else 'none')}@{precision.current()}"
            mode = self._gemm_dispatch().choose(a.shape[0], w.shape[0], a.shape[1], epilogue,
                                                lambda: agreeing(paths, args, 1e-4, self.xp))
        return paths.get(mode, paths["fused"])(*args, out)

    def linear_backward16(self, x, weight, z, y, dy, activation, grad_weight, grad_bias, need_dx, kind):
        """linear_act_backward's products in mixed precision: dz in 16 bits straight from the kernel that
        undoes the activation and sums db (in float32), so the GEMMs' operand needs no cast of its own; z and
        y float32 or kind's 16-bit copy."""
        dz = dy if activation is None and grad_bias is None else \
            cuda_precision.bias_act_backward16(dy, z, y, activation, grad_bias, kind)  # (else: only a cast to do)
        dz, x, weight = self.gemm_operands16(dz, x, weight if need_dx else None)  # (the base's order; 16 bits as is)
        self.product16(dz.T, x.T, out=grad_weight, what="dw")
        return self.product16(dz, weight.T, what="dx") if need_dx else None

    def conv_gemm(self, x, weight, stride, padding):
        """ConvOps.conv_gemm; in mixed precision x and the weight are cast to 16 bits (gemm_operands16: the values
        the CPU rounds them to), x gathered into 16-bit columns (im2col16), which the backward keeps, and the
        product runs as product16."""
        if precision.current() == "fp32" or 0 in x.shape or 0 in weight.shape:
            return super().conv_gemm(x, weight, stride, padding)
        n, out_c = x.shape[0], weight.shape[0]
        conv_hw = pooled_size(x.shape[2:], weight.shape[2:], stride, padding)
        if min(conv_hw) <= 0:
            return super().conv_gemm(x, weight, stride, padding)
        x, weight = self.gemm_operands16(self.xp.ascontiguousarray(x), self.xp.ascontiguousarray(weight))
        cols = cuda_precision.im2col16(x, weight.shape[2:], stride, padding)  # (16-bit: kept for dW as it is)
        y_t = self.product16(weight.reshape(out_c, -1), cols, what="conv")
        return y_t.reshape(out_c, n, -1), cols, conv_hw

    @kernel_or_fallback("dy", "grad_bias", nonempty="dy", contiguous=("dy",))
    def conv_bias_act_backward(self, dy, y, activation, grad_bias):
        kind = precision.current()  # (y: a ReLU's output is kept in 16 bits in mixed precision)
        if not activations.from_output(activation) or not (y is None or float32_contiguous(y) or (
                kind != "fp32" and y.flags.c_contiguous and y.dtype == sixteen_bit_dtype(kind))):
            return super().conv_bias_act_backward(dy, y, activation, grad_bias)
        if kind != "fp32":  # dz_t in 16 bits for the GEMMs (their operand: no cast of its own)
            return cuda_precision.conv_bias_act_backward16(dy, y, activation, grad_bias, kind)
        return kernels.conv_bias_act_backward(dy, y, activation, grad_bias)

    def _conv_gemms_backward(self, dy_t, cols, x_shape, weight, grad_weight, stride, padding, need_dx):
        """ConvOps._conv_gemms_backward; in mixed precision its products run as product16 (dW = dY cols into
        grad_weight, dcols = dY^T W, each through transposed views: no copies)."""
        if precision.current() == "fp32" or 0 in dy_t.shape or 0 in cols.shape:
            return super()._conv_gemms_backward(dy_t, cols, x_shape, weight, grad_weight, stride, padding, need_dx)
        out_c = weight.shape[0]
        dy_t, cols, w = self.gemm_operands16(dy_t, cols, weight if need_dx else None)  # (the base's order)
        self.product16(dy_t, cols.T, out=grad_weight.reshape(out_c, -1), what="conv_dw")
        if not need_dx:
            return None
        dcols = self.product16(dy_t.T, w.reshape(out_c, -1).T, what="conv_dx")
        return self.col2im(dcols, x_shape, weight.shape[2:], stride, padding)

    def _make_paths16(self) -> dict:
        """product16's paths, made once: gpunet's 16-bit GEMM, its tensor-core version where it runs (compute
        capability 8.0 or more: bfloat16 fragments; the kernel traps below), cublasGemmEx, cuBLAS fp32."""
        self._paths16 = {"fused": cuda_precision.gemm16, "cublas": self._cublas16, "gemmex": self._gemmex16}
        if int(cupy_status()[0].cuda.Device().compute_capability) >= 80:
            self._paths16["wmma"] = functools.partial(cuda_precision.gemm16, tensor_cores=True)
        return self._paths16

    def _gemmex16(self, a, w, bias, activation, out=None):
        """cuBLAS's cublasGemmEx on the 16-bit operands themselves (tensor cores: 16-bit inputs, float32
        compute and output), then the epilogue in one pass. cuBLAS is column-major: the row-major y (M, N) is
        the column-major y^T = w . a^T, and a row-major (C-contiguous) operand is its transpose there."""
        cupy = cupy_status()[0]
        cublas, runtime = cupy.cuda.cublas, cupy.cuda.runtime
        (m, k), n = a.shape, w.shape[0]
        y = out if out is not None and out.flags.c_contiguous else self.xp.empty((m, n), dtype="float32")
        kind = runtime.CUDA_R_16BF if a.dtype.name == "bfloat16" else runtime.CUDA_R_16F
        (a, a_rows), (w, w_rows) = (_blas_layout(v, self.xp) for v in (a, w))
        w_op, ldw = (cublas.CUBLAS_OP_T, w.strides[0] // 2) if w_rows else (cublas.CUBLAS_OP_N, w.strides[1] // 2)
        a_op, lda = (cublas.CUBLAS_OP_N, a.strides[0] // 2) if a_rows else (cublas.CUBLAS_OP_T, a.strides[1] // 2)
        cublas.gemmEx(cupy.cuda.get_cublas_handle(), w_op, a_op, n, m, k, _ONE.ctypes.data, w.data.ptr, kind, ldw,
                      a.data.ptr, kind, lda, _ZERO.ctypes.data, y.data.ptr, runtime.CUDA_R_32F, n,
                      cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
        if bias is not None or activation is not None:
            kernels.bias_act_forward(y, bias, activation, y)
        if out is not None and y is not out:
            out[...] = y
            return out
        return y

    def _cublas16(self, a, w, bias, activation, out=None):
        """cuBLAS on the operands' float32 values (from_16bit, exact), then the epilogue in one pass."""
        a, w = (_converted(v, self.from_16bit) for v in (a, w))
        y = self.xp.matmul(a, w.T, out=out)
        if bias is not None or activation is not None:
            kernels.bias_act_forward(y, bias, activation, y)
        return y


_ONE, _ZERO = numpy.ones(1, numpy.float32), numpy.zeros(1, numpy.float32)  # gemmEx's alpha, beta (host pointers)


def _blas_layout(a, xp):
    """(a, rows): a 2-D array cuBLAS can read as it is, and whether its rows are contiguous (row-major, any
    leading dimension: a slice of rows too) or else its columns; a copy, row-major, when neither is (and for
    a dimension of one, whose stride says nothing)."""
    (r, c), (sr, sc), size = a.shape, a.strides, a.itemsize
    if r > 1 and c > 1:
        if sc == size and sr >= c * size:
            return a, True
        if sr == size and sc >= r * size:
            return a, False
    return xp.ascontiguousarray(a), True


def _converted(a, convert):
    """convert(a) for a C-contiguous a; for a transposed view of one, convert(a.T).T (no copy)."""
    return convert(a) if a.flags.c_contiguous else convert(a.T).T
