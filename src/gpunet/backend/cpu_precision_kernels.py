"""Numba kernels for the CPU's 16-bit rounding (mixed precision's reference, gpunet.backend.sixteen_bit_ops):
float32 rounded to float16 or bfloat16 and back in one pass, float32 to float16 and float16 to float32. NumPy's own
float16 cast takes about 2 ns an element here, and the round trip two passes; these take one pass of
integer operations. Each gives the bits NumPy and ml_dtypes give (round to nearest, ties to even;
overflow to +-Inf, float16 from 65520 on; subnormals kept; Inf kept), except a NaN's payload: a NaN
stays a NaN (tests/backend/test_cpu_precision_kernels.py compares them over every float16 and
bfloat16 boundary and a sample of all float32 classes)."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy

from gpunet.backend.cpu_kernels import numba_module


class PrecisionKernels(NamedTuple):
    round_f16: Callable  # (x bits, x, out bits, out): float32 x rounded to float16's values, into float32 out
    round_bf16: Callable  # (x bits, out bits): as round_f16, to bfloat16's
    to_f16: Callable  # (x bits, x, out uint16 bits): float32 to float16
    from_f16: Callable  # (x uint16 bits, table, out): float16 to float32, each of the 65536 values looked up


@functools.cache
def kernels() -> PrecisionKernels:
    numba = numba_module()
    u32, f32 = numpy.uint32, numpy.float32

    @numba.njit(cache=True)
    def round_f16(xu, xf, outu, outf):
        for i in range(xu.size):
            u = xu[i]
            sign, a = u & u32(0x80000000), u & u32(0x7FFFFFFF)
            if a >= u32(0x7F800000):  # Inf, NaN: kept
                outu[i] = u
            elif a >= u32(0x477FF000):  # 65520 and above: float16 overflows
                outu[i] = sign | u32(0x7F800000)
            elif a >= u32(0x38800000):  # float16's normal range: 13 bits dropped, to nearest even
                outu[i] = sign | ((a + u32(0xFFF) + ((a >> u32(13)) & u32(1))) & u32(0xFFFFE000))
            else:  # float16's subnormals, multiples of 2^-24: 0.5 + |x| rounds |x| so (0.5's ulp is 2^-24), to even
                rounded = (f32(0.5) + abs(xf[i])) - f32(0.5)
                outf[i] = -rounded if sign else rounded

    @numba.njit(cache=True)
    def round_bf16(xu, outu):
        for i in range(xu.size):
            u = xu[i]
            if (u & u32(0x7FFFFFFF)) > u32(0x7F800000):  # NaN: kept (rounding could carry it to Inf)
                outu[i] = u
            else:  # 16 bits dropped, to nearest even; float32's largest values round up to Inf, as they should
                outu[i] = (u + u32(0x7FFF) + ((u >> u32(16)) & u32(1))) & u32(0xFFFF0000)

    @numba.njit(cache=True)
    def to_f16(xu, xf, out):
        for i in range(xu.size):
            u = xu[i]
            sign, a = (u >> u32(16)) & u32(0x8000), u & u32(0x7FFFFFFF)
            if a > u32(0x7F800000):  # NaN: float16's, quiet, with the top of its payload
                out[i] = numpy.uint16(sign | u32(0x7E00) | ((a >> u32(13)) & u32(0x3FF)))
            elif a >= u32(0x477FF000):  # 65520 and above (Inf too): Inf
                out[i] = numpy.uint16(sign | u32(0x7C00))
            elif a >= u32(0x38800000):  # normal: rounded as in round_f16, the exponent rebiased from 127 to 15
                a = (a + u32(0xFFF) + ((a >> u32(13)) & u32(1))) & u32(0xFFFFE000)
                out[i] = numpy.uint16(sign | ((a - u32(0x38000000)) >> u32(13)))
            else:  # subnormal or zero: the multiple of 2^-24 (0.5 + |x| rounds it, as above)
                rounded = (f32(0.5) + abs(xf[i])) - f32(0.5)
                out[i] = numpy.uint16(sign | u32(rounded * f32(16777216.0)))

    @numba.njit(cache=True)
    def from_f16(xu, table, out):
        for i in range(xu.size):
            out[i] = table[xu[i]]

    return PrecisionKernels(round_f16, round_bf16, to_f16, from_f16)


@functools.cache
def _float16_values() -> numpy.ndarray:
    """Every float16 bit pattern's float32 value (NumPy's, exact), by the pattern."""
    return numpy.arange(2**16, dtype=numpy.uint32).astype(numpy.uint16).view(numpy.float16).astype(numpy.float32)


def round_16bit(x: numpy.ndarray, kind: str) -> numpy.ndarray:
    """float32 x (C-contiguous) rounded to kind's 16-bit format and back, as a new float32 array."""
    out = numpy.empty_like(x)
    flat, flat_out = x.reshape(-1), out.reshape(-1)
    if kind == "fp16":
        kernels().round_f16(flat.view(numpy.uint32), flat, flat_out.view(numpy.uint32), flat_out)
    else:
        kernels().round_bf16(flat.view(numpy.uint32), flat_out.view(numpy.uint32))
    return out


def to_float16(x: numpy.ndarray) -> numpy.ndarray:
    """float32 x (C-contiguous) as a new float16 array, rounded to nearest even."""
    out = numpy.empty(x.shape, dtype=numpy.float16)
    flat = x.reshape(-1)
    kernels().to_f16(flat.view(numpy.uint32), flat, out.reshape(-1).view(numpy.uint16))
    return out


def from_float16(x: numpy.ndarray) -> numpy.ndarray:
    """float16 x (C-contiguous) as a new float32 array (exact: NumPy's own values, looked up)."""
    out = numpy.empty(x.shape, dtype=numpy.float32)
    kernels().from_f16(x.reshape(-1).view(numpy.uint16), _float16_values(), out.reshape(-1))
    return out
