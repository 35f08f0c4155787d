"""The CPU's Numba 16-bit conversions (gpunet.backend.cpu_precision_kernels, NumpyOps.round_16bit,
to_16bit and from_16bit) give NumPy's and ml_dtypes' bits: every float16 value and bfloat16 boundary with its float32
neighbours (the ties, both sides of each), the overflow and subnormal edges, and random float32 bit patterns
of every class. A NaN stays a NaN (its payload may differ, as on the GPU: docs/precision.md)."""
from __future__ import annotations

import ml_dtypes
import numpy
import pytest

from gpunet.backend import cpu_precision_kernels
from gpunet.backend.numpy_ops import NumpyOps


def cases() -> numpy.ndarray:
    halves = numpy.arange(2**16, dtype=numpy.uint32).astype(numpy.uint16).view(numpy.float16).astype(numpy.float32)
    near = halves.view(numpy.uint32).astype(numpy.int64)
    ties = near + 0x1000  # halfway to the next float16 (13 bits dropped), in the normal range
    bfloat = numpy.arange(2**16, dtype=numpy.int64) << 16
    patterns = [near + d for d in (-1, 0, 1)] + [ties + d for d in (-1, 0, 1)] + \
        [bfloat + d for d in (1, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]
    random_bits = numpy.random.default_rng(0).integers(0, 2**32, 200_000, dtype=numpy.int64)
    edges = numpy.array([65504, 65519.996, 65520, 65536, 2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26,
                         -0.0, numpy.inf, -numpy.inf, numpy.nan, 3.4028235e38], "float32")
    every = numpy.concatenate(patterns + [random_bits]) % 2**32
    return numpy.concatenate([every.astype(numpy.uint32).view(numpy.float32), edges])


def assert_same_bits(got, want, what):
    unsigned = numpy.uint32 if want.dtype.itemsize == 4 else numpy.uint16
    same = (got.view(unsigned) == want.view(unsigned)) | (numpy.isnan(got) & numpy.isnan(want))
    bad = numpy.flatnonzero(~same)
    assert not bad.size, f"{what}: {bad.size} differ, first at {got.flat[bad[0]]!r} against {want.flat[bad[0]]!r}"


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_rounding_gives_numpys_and_ml_dtypes_bits(kind):
    x = cases()
    dtype = numpy.float16 if kind == "fp16" else ml_dtypes.bfloat16
    with numpy.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dtype)
    assert_same_bits(cpu_precision_kernels.round_16bit(x, kind), want.astype(numpy.float32), f"round_16bit {kind}")
    ops = NumpyOps()
    shaped = x[: 6 * 1000].reshape(6, 1000)
    assert_same_bits(ops.round_16bit(shaped, kind), want[: 6000].reshape(6, 1000).astype(numpy.float32), "NumpyOps")
    assert_same_bits(ops.to_16bit(shaped, kind), want[: 6000].reshape(6, 1000), f"NumpyOps.to_16bit {kind}")
    if kind == "fp16":
        assert_same_bits(cpu_precision_kernels.to_float16(x), want, "to_float16")
        every = numpy.arange(2**16, dtype=numpy.uint32).astype(numpy.uint16).view(numpy.float16)[::-1].copy()
        assert_same_bits(cpu_precision_kernels.from_float16(every), every.astype(numpy.float32), "from_float16")
        assert_same_bits(ops.from_16bit(want[:6000].reshape(6, 1000)), want[:6000].reshape(6, 1000).astype("float32"),
                         "NumpyOps.from_16bit")


def test_views_and_empty_arrays():
    ops = NumpyOps()
    x = numpy.random.default_rng(1).standard_normal((4, 6)).astype("float32")
    assert_same_bits(ops.round_16bit(x.T, "fp16"), x.T.astype(numpy.float16).astype(numpy.float32), "a view")
    assert_same_bits(ops.to_16bit(x[:, ::2], "fp16"), x[:, ::2].astype(numpy.float16), "a strided view")
    assert_same_bits(ops.from_16bit(x.astype(numpy.float16).T), x.astype(numpy.float16).T.astype("float32"), "16-bit")
    assert ops.round_16bit(numpy.zeros((0, 3), "float32"), "bf16").shape == (0, 3)
    assert ops.to_16bit(numpy.zeros((2, 0), "float32"), "fp16").shape == (2, 0)
