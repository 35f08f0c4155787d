"""The compute type of products, as CuPy 14's cupy/_core/_routines_linalg.pyx keeps it: one per
float dtype, undecided (TBD) until first read, then DEFAULT, or TF32 for float32 when CUPY_TF32 > 0;
TF32 and BF16 need compute capability 8.0 (the stand-in's device is 9.0).

With COMPUTE_TYPE_TF32 cuBLAS rounds the inputs of float32 products to TF32 (10 mantissa bits);
the stand-in's matmul, dot and tensordot do the same (tf32()), so a test sees the precision a GPU
would give."""
from __future__ import annotations

import os

import numpy

COMPUTE_TYPE_TBD = 0
COMPUTE_TYPE_DEFAULT = 1
COMPUTE_TYPE_PEDANTIC = 2
COMPUTE_TYPE_FP16 = 3
COMPUTE_TYPE_FP32 = 4
COMPUTE_TYPE_FP64 = 5
COMPUTE_TYPE_BF16 = 6
COMPUTE_TYPE_TF32 = 7

compute_types = [COMPUTE_TYPE_TBD] * 4  # bfloat16, float16, float32, float64


def to_compute_type_index(dtype) -> int:
    char = numpy.dtype(dtype).char
    if char == "e":
        return 1
    if char in "fF":
        return 2
    if char in "dD":
        return 3
    raise TypeError(f"dtype is not supported: {dtype}")


def set_compute_type(dtype, compute_type) -> None:
    if compute_type in (COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC, COMPUTE_TYPE_FP16,
                        COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64, COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32):
        compute_types[to_compute_type_index(dtype)] = compute_type  # (the device is sm_90: TF32 is allowed)
    else:
        raise ValueError(f"Unknown compute type: {compute_type}")


def get_compute_type(dtype) -> int:
    index = to_compute_type_index(dtype)
    if compute_types[index] == COMPUTE_TYPE_TBD:
        tf32 = numpy.dtype(dtype).char in "fF" and int(os.getenv("CUPY_TF32", "0")) > 0
        set_compute_type(dtype, COMPUTE_TYPE_TF32 if tf32 else COMPUTE_TYPE_DEFAULT)
    return compute_types[index]


def tf32(x: numpy.ndarray) -> numpy.ndarray:
    """float32 values rounded to TF32 (mantissa to 10 bits, to nearest, ties to even), as cuBLAS
    rounds the inputs of a TF32 product; infinities and NaN pass unchanged."""
    bits = numpy.ascontiguousarray(x, dtype=numpy.float32).view(numpy.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    half_even = numpy.uint32(0x0FFF) + ((bits >> numpy.uint32(13)) & numpy.uint32(1))
    rounded = (bits + half_even) & numpy.uint32(0xFFFFE000)
    return numpy.where(finite, rounded, bits).view(numpy.float32).reshape(numpy.shape(x))
