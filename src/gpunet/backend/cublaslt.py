"""cuBLASLt's fused bias (+ ReLU) epilogue through nvmath-python: a third way to run a Dense
product with its epilogue, measured by the GEMM dispatch (CupyOps.linear) beside gpunet's fused
kernel and cuBLAS followed by a separate epilogue pass.

Optional: the extras cuda12-lt and cuda13-lt install nvmath-python; without it this path is not a
candidate. cuBLASLt's BIAS epilogues add one bias entry per row of D = A B, into a column-major
D only, so y (B, N) = x (B, K) W^T + b is computed as D = W x^T (N, B): D's column-major memory
is y's row-major, and D.T is y with no copy. GELU_BIAS is cuBLASLt's tanh approximation, not the
exact GELU that gpunet and torch compute, so a GELU epilogue stays with the other two paths.
"""
from __future__ import annotations

from gpunet.backend.cuda_kernels import cupy_module

EPILOGS = {None: "BIAS", "relu": "RELU_BIAS"}  # gpunet's activation -> nvmath's MatmulEpilog


def available() -> bool:
    """Whether nvmath-python can be imported (it brings cuBLASLt)."""
    try:
        import nvmath.linalg.advanced  # noqa: F401
    except Exception:  # noqa: BLE001 - a missing package or CUDA library alike: no cuBLASLt path
        return False
    return True


def handles(bias, activation) -> bool:
    return bias is not None and activation in EPILOGS


class LtLinear:
    """y = activation(x W^T + b) in one cuBLASLt call. Each (device, shapes, activation) is planned
    once (nvmath's Matmul.plan chooses the algorithm) and later calls reset its operands."""

    def __init__(self):
        self._plans: dict = {}

    def __call__(self, x, weight, bias, activation, out=None):
        from nvmath.linalg.advanced import Matmul, MatmulEpilog

        key = (cupy_module().cuda.Device().id, x.shape, weight.shape, activation)
        plan = self._plans.get(key)
        if plan is None:
            plan = Matmul(weight, x.T)
            plan.plan(epilog=getattr(MatmulEpilog, EPILOGS[activation]), epilog_inputs={"bias": bias})
            self._plans[key] = plan
        else:
            plan.reset_operands(a=weight, b=x.T, epilog_inputs={"bias": bias})
        y = plan.execute().T
        if out is None:
            return y
        out[...] = y
        return out
