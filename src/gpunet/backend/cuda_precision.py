"""The wrappers of kernels/precision.cu: float32 to and from the 16-bit formats, as arrays of the
dtypes CuPy 14 holds them in (ml_dtypes.bfloat16 for "bf16", float16 for "fp16": ops.sixteen_bit_dtype),
and float32 rounded through either. Each conversion to 16 bits rounds to nearest even, as NumPy and
ml_dtypes do on the CPU (a NaN becomes the canonical NaN there, whatever its payload).

As in cuda_wrappers.py, each kernel is declared with its parameter types as the .cu file spells them
(cuda_kernels.Kernel), and the wrapper owns the grid and the output it allocates; CupyOps calls these
on C-contiguous, non-empty arrays only (empty ones never reach a launch).
"""
from __future__ import annotations

from gpunet.backend.cuda_kernels import Kernel, blocks_for, cupy_module as _cupy
from gpunet.backend.ops import sixteen_bit_dtype

CAST_F32_TO_BF16 = Kernel("precision", "cast_f32_to_bf16", "float*, __nv_bfloat16*, long long")
CAST_F32_TO_F16 = Kernel("precision", "cast_f32_to_f16", "float*, __half*, long long")
CAST_BF16_TO_F32 = Kernel("precision", "cast_bf16_to_f32", "__nv_bfloat16*, float*, long long")
CAST_F16_TO_F32 = Kernel("precision", "cast_f16_to_f32", "__half*, float*, long long")
ROUND_TRIP_BF16 = Kernel("precision", "round_trip_bf16", "float*, float*, long long")
ROUND_TRIP_F16 = Kernel("precision", "round_trip_f16", "float*, float*, long long")

_TO_16BIT = {"bf16": CAST_F32_TO_BF16, "fp16": CAST_F32_TO_F16}
_FROM_16BIT = {"bfloat16": CAST_BF16_TO_F32, "float16": CAST_F16_TO_F32}  # by the array's dtype name
_ROUND_TRIP = {"bf16": ROUND_TRIP_BF16, "fp16": ROUND_TRIP_F16}


def to_16bit(x, kind: str):
    """float32 x (C-contiguous, not empty) rounded into a new array of kind's 16-bit dtype."""
    y = _cupy().empty(x.shape, dtype=sixteen_bit_dtype(kind))  # (a kind other than bf16 or fp16 raises here)
    _TO_16BIT[kind](blocks_for(x.size), x, y, x.size)
    return y


def from_16bit(x):
    """A bfloat16 or float16 array (C-contiguous, not empty) as a new float32 array, exactly."""
    y = _cupy().empty(x.shape, dtype="float32")
    _FROM_16BIT[x.dtype.name](blocks_for(x.size), x, y, x.size)
    return y


def round_16bit(x, kind: str, out=None):
    """float32 x (C-contiguous, not empty) rounded to kind's 16-bit format and back, into out (may be
    x; a new array by default): one launch, no 16-bit array in between."""
    sixteen_bit_dtype(kind)  # (a kind other than bf16 or fp16 raises here)
    y = _cupy().empty_like(x) if out is None else out
    _ROUND_TRIP[kind](blocks_for(x.size), x, y, x.size)
    return y
