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

from gpunet.backend.cuda_kernels import (ACTIVATION_CODES, ROWS_PER_CHUNK, TILE_M, TILE_N, Kernel, blocks_for, ceil_div,
                                         cupy_module as _cupy, done_blocks_counter, grid_2d)
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


_BIAS_ACT_BACKWARD16_PARAMS = "float*, {0}*, {0}*, {1}*, float*, float*, unsigned int*, int, int, int, int, int"
BIAS_ACT_BACKWARD_BF16 = Kernel("gemm16", "bias_act_backward_bf16",
                                _BIAS_ACT_BACKWARD16_PARAMS.format("__nv_bfloat16", "__nv_bfloat16"))
BIAS_ACT_BACKWARD_F16 = Kernel("gemm16", "bias_act_backward_f16", _BIAS_ACT_BACKWARD16_PARAMS.format("__half", "__half"))
BIAS_ACT_BACKWARD_DZ_BF16 = Kernel("gemm16", "bias_act_backward_dz_bf16",
                                   _BIAS_ACT_BACKWARD16_PARAMS.format("float", "__nv_bfloat16"))
BIAS_ACT_BACKWARD_DZ_F16 = Kernel("gemm16", "bias_act_backward_dz_f16", _BIAS_ACT_BACKWARD16_PARAMS.format("float", "__half"))
# (dz's kind, whether z and y are 16-bit) -> the kernel
_BIAS_ACT_BACKWARD16 = {("bf16", True): BIAS_ACT_BACKWARD_BF16, ("fp16", True): BIAS_ACT_BACKWARD_F16,
                        ("bf16", False): BIAS_ACT_BACKWARD_DZ_BF16, ("fp16", False): BIAS_ACT_BACKWARD_DZ_F16}


def bias_act_backward16(dy, z, y, activation, grad_bias, kind: str):
    """cuda_wrappers.bias_act_backward with dz written in kind's 16-bit dtype (a new array): the operand of the
    GEMMs that follow, the values to_16bit of the float32 dz gives, in the same launch; grad_bias (when given)
    summed from the float32 values. dy (M, N) float32; z and y (whichever the activation reads; None
    otherwise) both float32 or both kind's 16-bit dtype. All C-contiguous, M and N > 0."""
    m, n = dy.shape
    dz = _cupy().empty((m, n), dtype=sixteen_bit_dtype(kind))
    read = [a for a in (z, y) if a is not None] if activation is not None else []
    kept16 = not read or is_16bit(read[0])
    if any(a.dtype != (dz.dtype if kept16 else dy.dtype) for a in read):
        raise TypeError(f"bias_act_backward16: z and y must both be float32 or both {dz.dtype}, got "
                        f"{', '.join(str(a.dtype) for a in read)}")
    unread = read[0] if read else dz  # (stands in for an operand the kernel does not read: any of its type)
    z, y = (unread if a is None or not read else a for a in (z, y))
    chunks = ceil_div(m, ROWS_PER_CHUNK)
    partial = _cupy().empty((chunks, n), dtype="float32")
    kernel = _BIAS_ACT_BACKWARD16[(kind, kept16)]
    kernel(grid_2d(ceil_div(n, kernel.block), chunks), dy, z, y, dz, partial,
           partial if grad_bias is None else grad_bias, done_blocks_counter(), m, n,
           ACTIVATION_CODES[activation], True, grad_bias is not None)
    return dz


_CONV_BIAS_ACT_BACKWARD16_PARAMS = "float*, {0}*, {1}*, float*, int, int, long long, int, int"
CONV_BIAS_ACT_BACKWARD_BF16 = Kernel("gemm16", "conv_bias_act_backward_bf16",
                                     _CONV_BIAS_ACT_BACKWARD16_PARAMS.format("__nv_bfloat16", "__nv_bfloat16"))
CONV_BIAS_ACT_BACKWARD_F16 = Kernel("gemm16", "conv_bias_act_backward_f16",
                                    _CONV_BIAS_ACT_BACKWARD16_PARAMS.format("__half", "__half"))
CONV_BIAS_ACT_BACKWARD_DZ_BF16 = Kernel("gemm16", "conv_bias_act_backward_dz_bf16",
                                        _CONV_BIAS_ACT_BACKWARD16_PARAMS.format("float", "__nv_bfloat16"))
CONV_BIAS_ACT_BACKWARD_DZ_F16 = Kernel("gemm16", "conv_bias_act_backward_dz_f16",
                                       _CONV_BIAS_ACT_BACKWARD16_PARAMS.format("float", "__half"))
_CONV_BIAS_ACT_BACKWARD16 = {("bf16", True): CONV_BIAS_ACT_BACKWARD_BF16, ("fp16", True): CONV_BIAS_ACT_BACKWARD_F16,
                             ("bf16", False): CONV_BIAS_ACT_BACKWARD_DZ_BF16,
                             ("fp16", False): CONV_BIAS_ACT_BACKWARD_DZ_F16}


def conv_bias_act_backward16(dy, y, activation, grad_bias, kind: str):
    """cuda_wrappers.conv_bias_act_backward with dz_t (C, N * L) written in kind's 16-bit dtype, the GEMMs'
    operand (to_16bit of the float32 dz_t, in the same launch); grad_bias (when given) summed from the float32
    values. dy (N, C, H, W) float32; y (read with an activation; relu, sigmoid or tanh) float32 or kind's 16-bit
    dtype. C-contiguous, not empty."""
    n, out_c, h, w = dy.shape
    dz_t = _cupy().empty((out_c, n * h * w), dtype=sixteen_bit_dtype(kind))
    y = None if activation is None else y
    if y is not None and y.dtype not in (dy.dtype, dz_t.dtype):
        raise TypeError(f"conv_bias_act_backward16: y must be float32 or {dz_t.dtype}, got {y.dtype}")
    kernel = _CONV_BIAS_ACT_BACKWARD16[(kind, y is None or is_16bit(y))]
    kernel(out_c, dy, dz_t if y is None else y, dz_t, dy if grad_bias is None else grad_bias, n, out_c, h * w,
           ACTIVATION_CODES[activation], grad_bias is not None)  # (y, grad_bias: unread when None)
    return dz_t


ACTIVATION_BACKWARD_BF16 = Kernel("gemm16", "activation_backward_bf16",
                                  "__nv_bfloat16*, __nv_bfloat16*, float*, float*, long long, int")
ACTIVATION_BACKWARD_F16 = Kernel("gemm16", "activation_backward_f16", "__half*, __half*, float*, float*, long long, int")
_ACTIVATION_BACKWARD16 = {"bfloat16": ACTIVATION_BACKWARD_BF16, "float16": ACTIVATION_BACKWARD_F16}  # by y's dtype


def activation_backward16(y, dy, activation):
    """dy * activation'(y) (float32) from the 16-bit y a mixed-precision ReLU keeps (relu'(x) = relu'(y)): what
    cuda_wrappers.activation_backward gives on from_16bit(y), one launch. C-contiguous, not empty."""
    dx = _cupy().empty_like(dy)
    _ACTIVATION_BACKWARD16[y.dtype.name](blocks_for(dy.size), y, y, dy, dx, dy.size, ACTIVATION_CODES[activation])
    return dx
