"""The CuPy stand-in's 16-bit floats, as CuPy 14.2 has them (cupy#9494: bfloat16 is ml_dtypes.bfloat16,
"experimental"; float16 is NumPy's): arrays of either dtype, astype between them and float32, .get()
with the same dtype and bits, RawModule kernels taking them as pointers, arithmetic in the 16-bit
dtype, reductions accumulated in float32 as CuPy's are; and where the stand-in is stricter (said in
tests/gpu_standin/cupy/_ndarray.py): the ufuncs CuPy has no bfloat16 loop for, and ml_dtypes' other
types. These test the harness itself, so they run only where the stand-in is the GPU."""
from __future__ import annotations

import ml_dtypes
import numpy
import pytest

from gpunet.backend import cuda_precision
from gpunet.backend.cuda_kernels import source
from tests.kernels.test_fp16_emulation import float32_sample
from tests.support.arrays import ON_STANDIN

pytestmark = pytest.mark.skipif(not ON_STANDIN, reason="tests the CuPy stand-in, which a real GPU replaces")
BF16, F16 = numpy.dtype(ml_dtypes.bfloat16), numpy.dtype(numpy.float16)


@pytest.fixture(scope="module")
def cupy():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def sample():
    return float32_sample(random_count=1 << 14).view(numpy.float32)


def bits(a) -> numpy.ndarray:
    return a.view(numpy.uint16 if a.dtype.itemsize == 2 else numpy.uint32)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_arrays_move_both_ways_with_their_dtype_and_bits(cupy, dtype):
    host = numpy.arange(1 << 16, dtype=numpy.uint32).astype(numpy.uint16).view(dtype)
    device = cupy.asarray(host)
    assert device.dtype == dtype and device.nbytes == 2 * host.size
    back = device.get()
    assert back.dtype == dtype and (bits(back) == bits(host)).all()
    assert cupy.asnumpy(device[3:5]).dtype == dtype
    assert (bits(cupy.zeros(4, dtype).get()) == 0).all() and cupy.empty((2, 3), dtype=dtype).dtype == dtype
    assert cupy.float16 is numpy.float16
    with pytest.raises(AttributeError, match="ml_dtypes.bfloat16"):
        cupy.bfloat16  # noqa: B018  (CuPy 14.2 has none: the dtype is ml_dtypes')


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_astype_rounds_to_nearest_even_and_back_exactly(cupy, sample, dtype):
    with numpy.errstate(over="ignore", invalid="ignore"):
        want = sample.astype(dtype)
        down = cupy.asarray(sample).astype(dtype)
        assert down.dtype == dtype and (bits(down.get()) == bits(want)).all()
        up = down.astype(numpy.float32).get()
        assert (bits(up) == bits(want.astype(numpy.float32))).all()
        other = F16 if dtype == BF16 else BF16  # 16 to 16 bits: through float32, as CuPy's conversions
        assert (bits(down.astype(other).get()) == bits(want.astype(numpy.float32).astype(other))).all()


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_arithmetic_keeps_the_16bit_dtype_and_rounds_once(cupy, dtype):
    r = numpy.random.default_rng(0)
    a, b = (r.standard_normal(1000).astype(dtype) for _ in range(2))
    x, y = cupy.asarray(a), cupy.asarray(b)
    for got, want in ((x + y, a + b), (x * y, a * b), (x - y, a - b), (x / y, a / b), (-x, -a), (x * 2.0, a * 2.0),
                      (cupy.maximum(x, y), numpy.maximum(a, b)), (cupy.exp(x), numpy.exp(a))):
        assert got.dtype == dtype and (bits(got.get()) == bits(want)).all()
    assert (x + cupy.asarray(b.astype(numpy.float32))).dtype == numpy.float32  # a float32 array promotes


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_sums_and_means_accumulate_in_float32_as_cupys_do(cupy, dtype):
    """CuPy 14.2's sum, prod and mean of float16 and bfloat16 reduce in float and round once; NumPy
    sums float16 along an axis in float16 and ml_dtypes sums bfloat16 in bfloat16 (4096 ones give 256)."""
    ones = cupy.ones((4096, 3), dtype)
    for total in (ones.sum(axis=0), cupy.sum(ones, axis=0), ones.sum(0)):
        assert total.dtype == dtype and total.get().astype(numpy.float32).tolist() == [4096.0] * 3
    assert float(ones.sum()) == 3 * 4096 and ones.sum().dtype == dtype
    assert float(cupy.mean(ones)) == 1.0 and float(cupy.prod(ones)) == 1.0
    assert cupy.sum(ones, dtype=numpy.float32).dtype == numpy.float32  # an explicit dtype is NumPy's to follow
    assert ones.max().dtype == dtype


def test_ufuncs_without_a_bfloat16_loop_are_refused(cupy):
    """CuPy 14.2 has no bfloat16 loop for clip, rounding, divmod, logical_not and logical_xor (their
    `types`; cupy#9630): it would compute them in another type. The stand-in refuses them."""
    x = cupy.asarray(numpy.array([0.5, 1.5, -2.5], BF16))
    for refused in (lambda: cupy.clip(x, 0, 1), lambda: x.clip(0, 1), lambda: cupy.round(x), lambda: x.round(),
                    lambda: cupy.around(x), lambda: cupy.divmod(x, x), lambda: cupy.logical_not(x),
                    lambda: cupy.logical_xor(x, x)):
        with pytest.raises(TypeError, match="no bfloat16 loop"):
            refused()
    half = cupy.asarray(numpy.array([0.5, 1.5, -2.5], F16))  # float16 has them all
    assert cupy.clip(half, 0, 1).dtype == F16 and half.round().dtype == F16


def test_ml_dtypes_other_types_are_refused(cupy):
    with pytest.raises(TypeError, match="no float8_e4m3fn arrays"):
        cupy.zeros(3, ml_dtypes.float8_e4m3fn)
    with pytest.raises(TypeError, match="no float8_e5m2 arrays"):
        cupy.asarray(numpy.zeros(3, ml_dtypes.float8_e5m2))
    with pytest.raises(TypeError, match="no float8_e4m3fn arrays"):
        cupy.zeros(4, numpy.uint8).view(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("kind, dtype", [("bf16", BF16), ("f16", F16)])
def test_raw_kernels_take_16bit_arrays_as_pointers(cupy, sample, kind, dtype):
    module = cupy.RawModule(code=source("precision"))
    x = cupy.asarray(sample)
    y = cupy.empty(sample.shape, dtype)
    module.get_function(f"cast_f32_to_{kind}")((64,), (256,), (x, y, numpy.int64(sample.size)))
    with numpy.errstate(over="ignore", invalid="ignore"):
        want = sample.astype(dtype)
    nan = numpy.isnan(sample)
    assert (bits(y.get())[~nan] == bits(want)[~nan]).all() and (bits(y.get())[nan] == 0x7FFF).all()
    back = cupy.empty(sample.shape, numpy.float32)
    module.get_function(f"cast_{kind}_to_f32")((64,), (256,), (y, back, numpy.int64(sample.size)))
    assert (bits(back.get())[~nan] == bits(want.astype(numpy.float32))[~nan]).all()


def test_gpunets_wrappers_refuse_an_array_of_the_wrong_16bit_dtype(cupy):
    x = cupy.ones(8, numpy.float32)
    with pytest.raises(TypeError, match="argument 1: expected a C-contiguous bfloat16 array, got a float16 array"):
        cuda_precision.CAST_F32_TO_BF16(1, x, cupy.empty(8, F16), 8)
    with pytest.raises(TypeError, match="argument 0: expected a C-contiguous float16 array, got a bfloat16 array"):
        cuda_precision.CAST_F16_TO_F32(1, cupy.empty(8, BF16), x, 8)
    with pytest.raises(ValueError, match="16-bit kind must be 'bf16' or 'fp16', got 'f16'"):
        cuda_precision.to_16bit(x, "f16")
