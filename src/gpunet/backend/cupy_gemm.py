"""The ways CupyOps runs a Dense product with its epilogue, and the GEMM dispatch that picks one: a
mixin of CupyOps (cupy_ops.py), which reads self.xp, self._paths, self._lt, self._dispatch and self.tf32.

Each path takes (x, weight, bias, activation, out) and gives y, into out when given: gpunet's fused
kernel (kernels/gemm.cu), cuBLAS then one epilogue pass, or cuBLASLt's fused epilogue (cublaslt.py,
with nvmath-python). The operands come as CupyOps.linear hands them: in mixed precision, float32 arrays
holding 16-bit values, which every path multiplies exactly and sums in float32."""
from __future__ import annotations

from gpunet.backend import cublaslt
from gpunet.backend import cuda_wrappers as kernels
from gpunet.backend.cuda_kernels import compile_inputs
from gpunet.backend.devices import cupy_status, gpu_name
from gpunet.backend.gemm_dispatch import GemmDispatch, source_hash


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
            kernels_version = source_hash(*compile_inputs("gemm"), f"cublaslt={self._lt is not None}")
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
