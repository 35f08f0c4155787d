"""The wrappers of kernels/precision.cu: float32 to and from the 16-bit formats, as arrays of the
dtypes CuPy 14 holds them in (ml_dtypes.bfloat16 for "bf16", float16 for "fp16": ops.sixteen_bit_dtype),
and float32 rounded through either, and the 16-bit im2col; and of kernels/gemm16.cu, the GEMM of 16-bit
operands. Each conversion to 16 bits rounds to nearest even, as NumPy and
ml_dtypes do on the CPU (a NaN becomes the canonical NaN there, whatever its payload).

As in cuda_wrappers.py, each kernel is declared with its parameter types as the .cu file spells them
(cuda_kernels.Kernel), and the wrapper owns the grid and the output it allocates; CupyOps calls these
on C-contiguous, non-empty arrays only (empty ones never reach a launch).
"""
from __future__ import annotations

from gpunet.backend.cuda_kernels import (ACTIVATION_CODES, TILE_M, TILE_N, Kernel, blocks_for, ceil_div,
                                         cupy_module as _cupy, grid_2d)
from gpunet.backend.ops import is_16bit, pooled_size, sixteen_bit_dtype

CAST_F32_TO_BF16 = Kernel("precision", "cast_f32_to_bf16", "float*, __nv_bfloat16*, long long")
CAST_F32_TO_F16 = Kernel("precision", "cast_f32_to_f16", "float*, __half*, long long")
CAST_BF16_TO_F32 = Kernel("precision", "cast_bf16_to_f32", "__nv_bfloat16*, float*, long long")
CAST_F16_TO_F32 = Kernel("precision", "cast_f16_to_f32", "__half*, float*, long long")
ROUND_TRIP_BF16 = Kernel("precision", "round_trip_bf16", "float*, float*, long long")
ROUND_TRIP_F16 = Kernel("precision", "round_trip_f16", "float*, float*, long long")

_GEOMETRY = ", int, int, int, int, int, int, int, int, int, int, int, int"  # (im2col.cuh's GEOMETRY_ARGS)
IM2COL_BF16 = Kernel("precision", "im2col_bf16", "__nv_bfloat16*, __nv_bfloat16*" + _GEOMETRY)
IM2COL_F16 = Kernel("precision", "im2col_f16", "__half*, __half*" + _GEOMETRY)

_TO_16BIT = {"bf16": CAST_F32_TO_BF16, "fp16": CAST_F32_TO_F16}
_IM2COL = {"bfloat16": IM2COL_BF16, "float16": IM2COL_F16}  # by the array's dtype name
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


def im2col16(x, kernel, stride, padding):
    """The (N*OH*OW, C*KH*KW) columns of a 16-bit x (N, C, H, W, C-contiguous), of its dtype, as Ops.im2col
    lays them out (OH * OW > 0)."""
    n, c, h, w = x.shape
    oh, ow = pooled_size((h, w), kernel, stride, padding)
    cols = _cupy().empty((n * oh * ow, c * kernel[0] * kernel[1]), dtype=x.dtype)
    _IM2COL[x.dtype.name](blocks_for(cols.size), x, cols, n, c, h, w, *kernel, *stride, *padding, oh, ow)
    return cols


def round_16bit(x, kind: str, out=None):
    """float32 x (C-contiguous, not empty) rounded to kind's 16-bit format and back, into out (may be
    x; a new array by default): one launch, no 16-bit array in between."""
    sixteen_bit_dtype(kind)  # (a kind other than bf16 or fp16 raises here)
    y = _cupy().empty_like(x) if out is None else out
    _ROUND_TRIP[kind](blocks_for(x.size), x, y, x.size)
    return y


_GEMM16_PARAMS = "strided {0}*, long long, long long, strided {0}*, long long, long long, float*, float*, int, int, " \
                 "int, int, int"
GEMM16 = {"bf16": Kernel("gemm16", "gemm16_bf16", _GEMM16_PARAMS.format("__nv_bfloat16")),
          "fp16": Kernel("gemm16", "gemm16_f16", _GEMM16_PARAMS.format("__half"))}
GEMM16_TC = {"bf16": Kernel("gemm16", "gemm16_tc_bf16", _GEMM16_PARAMS.format("__nv_bfloat16")),
             "fp16": Kernel("gemm16", "gemm16_tc_f16", _GEMM16_PARAMS.format("__half"))}
GEMM16_BF16, GEMM16_F16 = GEMM16["bf16"], GEMM16["fp16"]  # (by name, for cuda_wrappers.KERNELS)
GEMM16_TC_BF16, GEMM16_TC_F16 = GEMM16_TC["bf16"], GEMM16_TC["fp16"]
TC_ROWS, TC_COLS = 64, 32  # the tile of out one block of gemm16_tc computes (kernels/gemm16.cu)


def gemm16(a, w, bias, activation, out=None, tensor_cores: bool = False):
    """out (M, N) float32 = activation(a . w^T + bias) for 16-bit a (M, K) and w (N, K) of one dtype, in any
    layout (read through their strides: a transposed view costs no copy), float32 products and sums
    (kernels/gemm16.cu); bias (N) float32 or None; out, when given, in any layout. One block per TILE_M x
    TILE_N tile of out; with tensor_cores, gemm16_tc (nvcuda::wmma), one block per TC_ROWS x TC_COLS tile."""
    (m, k), n = a.shape, w.shape[0]
    if w.dtype != a.dtype or not is_16bit(a) or w.shape[1] != k:
        raise TypeError(f"gemm16 takes two 16-bit operands of one dtype, (M, K) and (N, K): got {a.dtype} {a.shape} "
                        f"and {w.dtype} {w.shape}")
    if out is not None and not out.flags.c_contiguous:  # (the kernels write out row-major)
        out[...] = gemm16(a, w, bias, activation, tensor_cores=tensor_cores)
        return out
    y = _cupy().empty((m, n), dtype="float32") if out is None else out
    kind = "bf16" if a.dtype.name == "bfloat16" else "fp16"
    size = a.dtype.itemsize
    kernel, (rows, cols) = (GEMM16_TC[kind], (TC_ROWS, TC_COLS)) if tensor_cores else (GEMM16[kind], (TILE_M, TILE_N))
    kernel(grid_2d(ceil_div(n, cols), ceil_div(m, rows)), a, a.strides[0] // size, a.strides[1] // size,
           w, w.strides[0] // size, w.strides[1] // size, y if bias is None else bias, y, m, n, k,
           bias is not None, ACTIVATION_CODES[activation])
    return y
