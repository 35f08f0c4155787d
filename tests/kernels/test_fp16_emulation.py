"""The kernel emulator's 16-bit floats (tests/cuda/cuda_fp16.h, cuda_bf16.h) against NumPy's float16
and ml_dtypes' bfloat16, bit for bit: float32 -> 16 bits rounds to nearest even (ties, subnormals,
overflow to Inf, Inf, the largest values) over a large sample of float32 bit patterns, through
kernels/precision.cu as gpunet builds it; 16 bits -> float32 exactly for every 16-bit pattern; the
arithmetic, comparisons, pairs, bit casts and atomics a kernel may use. A NaN is compared as a NaN:
the hardware (and so the emulator) writes the canonical NaN 0x7fff where NumPy and ml_dtypes keep a
NaN's sign and payload. The same probe compiles with nvcc against CUDA's own headers, so the
emulated names are CUDA's.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from fractions import Fraction

import ml_dtypes
import numpy
import pytest

from gpunet.backend.cuda_kernels import source
from tests.kernels.test_emulated import compiled, marshal

BF16 = numpy.dtype(ml_dtypes.bfloat16)
F16 = numpy.dtype(numpy.float16)
CANONICAL_NAN = 0x7FFF  # cvt.rn.f16.f32 / cvt.rn.bf16.f32 of any NaN


def float32_sample(random_count: int = 1 << 20, seed: int = 0) -> numpy.ndarray:
    """float32 values (as bits: uint32) for the 16-bit conversions: every upper half (sign, exponent,
    7 mantissa bits: every bfloat16) with lower halves at, just beside and between both formats'
    rounding points (bfloat16 ties at 0x8000, float16's at bit 12 with each parity of the bits kept);
    the midpoints of every pair of neighbouring float16 values (subnormal ones included) and the
    floats beside them; the edges (zeros, float subnormals, FLT_MIN, FLT_MAX, float16's largest value,
    its overflow threshold 65520 and its neighbours, Inf, NaNs of either sign and several payloads);
    and random patterns."""
    high = numpy.arange(1 << 16, dtype=numpy.uint32) << 16
    low = numpy.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x5000, 0x7000, 0x7FFF, 0x8000,
                       0x8001, 0x9000, 0xB000, 0xD000, 0xE000, 0xF000, 0xFFFF], dtype=numpy.uint32)
    grid = (high[:, None] | low[None, :]).ravel()
    halves = numpy.arange(0x7C00, dtype=numpy.uint16).view(numpy.float16).astype(numpy.float64)
    midpoints = ((halves[:-1] + halves[1:]) / 2).astype(numpy.float32).view(numpy.uint32)  # (exact in float32)
    midpoints = numpy.concatenate([midpoints - 1, midpoints, midpoints + 1])
    edges = numpy.array([0, 1, 2, 0x007FFFFF, 0x00800000, 0x00800001, 0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000,
                         0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x33000000, 0x33000001, 0x33800000,
                         0x387FFFFF, 0x38800000, 0x7F800000, 0x7F800001, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF,
                         0x7FC0DEAD], dtype=numpy.uint32)
    randoms = numpy.random.default_rng(seed).integers(0, 1 << 32, random_count, dtype=numpy.uint32)
    positive = numpy.concatenate([grid, midpoints, edges, randoms])
    return numpy.concatenate([positive, positive ^ numpy.uint32(0x80000000)])


def assert_same_16bit(got: numpy.ndarray, want: numpy.ndarray, what: str) -> None:
    """got (the emulator's bits) equals want (NumPy's), but where want is a NaN: there got is the canonical NaN."""
    got_bits, want_bits = got.view(numpy.uint16), want.view(numpy.uint16)
    nan = numpy.isnan(want.astype(numpy.float32))
    assert (got_bits[nan] == CANONICAL_NAN).all(), f"{what}: a NaN is not the canonical NaN"
    wrong = numpy.flatnonzero((got_bits != want_bits) & ~nan)
    assert wrong.size == 0, (f"{what}: {wrong.size} values differ, first input index {wrong[0]}: got "
                             f"{got_bits[wrong[0]]:#06x}, want {want_bits[wrong[0]]:#06x}")


def assert_same_float32(got: numpy.ndarray, want: numpy.ndarray, what: str) -> None:
    """Bit for bit, a NaN as a NaN."""
    nan = numpy.isnan(want)
    assert (numpy.isnan(got) == nan).all(), f"{what}: NaNs differ"
    wrong = numpy.flatnonzero(got.view(numpy.uint32) != want.view(numpy.uint32))
    wrong = wrong[~nan[wrong]]
    assert wrong.size == 0, f"{what}: {wrong.size} values differ, first at {wrong[0]}: {got[wrong[0]]!r} != {want[wrong[0]]!r}"


def launch(module, kernel: str, n: int, *args) -> None:
    module.launch(kernel, min(1024, -(-n // 256)), 256, marshal(module, kernel, (*args, n)))


@pytest.fixture(scope="module")
def precision():
    return compiled(source("precision"), "precision")


@pytest.fixture(scope="module")
def sample():
    return float32_sample().view(numpy.float32)


@pytest.mark.parametrize("kind, dtype", [("bf16", BF16), ("f16", F16)])
def test_float32_to_16bit_rounds_to_nearest_even_as_numpy(precision, sample, kind, dtype):
    out = numpy.empty(sample.size, numpy.uint16)
    launch(precision, f"cast_f32_to_{kind}", sample.size, sample, out)
    with numpy.errstate(over="ignore", invalid="ignore"):
        assert_same_16bit(out, sample.astype(dtype), f"float32 -> {dtype}")


@pytest.mark.parametrize("kind, dtype", [("bf16", BF16), ("f16", F16)])
def test_round_trip_is_the_float32_value_a_16bit_store_keeps(precision, sample, kind, dtype):
    out = numpy.empty_like(sample)
    launch(precision, f"round_trip_{kind}", sample.size, sample, out)
    with numpy.errstate(over="ignore", invalid="ignore"):
        assert_same_float32(out, sample.astype(dtype).astype(numpy.float32), f"round trip through {dtype}")
    inplace = sample[:4096].copy()  # y may be x
    launch(precision, f"round_trip_{kind}", inplace.size, inplace, inplace)
    assert_same_float32(inplace, out[:4096], "in place")


@pytest.mark.parametrize("kind, dtype", [("bf16", BF16), ("f16", F16)])
def test_every_16bit_value_converts_to_float32_exactly(precision, kind, dtype):
    bits = numpy.arange(1 << 16, dtype=numpy.uint32).astype(numpy.uint16)
    out = numpy.empty(bits.size, numpy.float32)
    launch(precision, f"cast_{kind}_to_f32", bits.size, bits, out)
    want = bits.view(dtype).astype(numpy.float32)
    assert_same_float32(out, want, f"{dtype} -> float32")
    if dtype == BF16:  # the upper half of the float: a NaN's payload too
        assert (out.view(numpy.uint32) == bits.astype(numpy.uint32) << 16).all()
    else:  # a NaN becomes the canonical float NaN (as CUDA's own host path writes it)
        assert (out.view(numpy.uint32)[numpy.isnan(want)] == 0x7FFFFFFF).all()


PROBE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Per pair i: a[i] op b[i] for + - * / (as 16-bit values, rounded once), the comparisons as bits.
template <class T>
__device__ void arithmetic(const T* a, const T* b, T* sums, T* differences, T* products, T* quotients,
                           int* compared, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    sums[i] = a[i] + b[i];
    differences[i] = __hsub(a[i], b[i]);
    T p = a[i];
    p *= b[i];
    products[i] = p;
    quotients[i] = a[i] / b[i];
    compared[i] = (a[i] == b[i]) | (a[i] != b[i]) << 1 | (a[i] < b[i]) << 2 | (a[i] <= b[i]) << 3 |
                  (a[i] > b[i]) << 4 | (a[i] >= b[i]) << 5 | __hisnan(a[i]) << 6 | (__hisinf(a[i]) + 1) << 7;
  }
}

extern "C" __global__ void half_arithmetic(const __half* a, const __half* b, __half* sums, __half* differences,
                                           __half* products, __half* quotients, int* compared, int n) {
  arithmetic(a, b, sums, differences, products, quotients, compared, n);
}

extern "C" __global__ void bfloat16_arithmetic(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* sums,
                                               __nv_bfloat16* differences, __nv_bfloat16* products,
                                               __nv_bfloat16* quotients, int* compared, int n) {
  arithmetic(a, b, sums, differences, products, quotients, compared, n);
}

// doubles and ints rounded once to 16 bits (constructors and __double2half / __double2bfloat16).
extern "C" __global__ void from_double(const double* x, const int* ints, __half* h, __nv_bfloat16* b,
                                       __half* hi, __nv_bfloat16* bi, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    h[i] = __double2half(x[i]);
    b[i] = __nv_bfloat16(x[i]);
    hi[i] = ints[i];
    bi[i] = __nv_bfloat16(ints[i]);
  }
}

// Pairs, bit casts, negation, sizes; and 64 threads adding 1 into one 16-bit value each.
extern "C" __global__ void pairs_and_atomics(const float* x, float* out, unsigned short* bits, __half* half_sum,
                                             __nv_bfloat16* bfloat16_sum) {
  const int t = threadIdx.x;
  atomicAdd(half_sum, __float2half(1.f));
  atomicAdd(bfloat16_sum, __float2bfloat16(1.f));
  if (t != 0) return;
  const __half2 h2 = __floats2half2_rn(x[0], x[1]);
  const float2 hf = __half22float2(__halves2half2(__high2half(h2), __low2half(h2)));
  const __nv_bfloat162 b2 = __float22bfloat162_rn(make_float2(x[0], x[1]));
  const float2 bf = __bfloat1622float2(__halves2bfloat162(__high2bfloat16(b2), __low2bfloat16(b2)));
  const float values[] = {hf.x, hf.y, __low2float(h2), __high2float(h2), bf.x, bf.y, __low2float(b2),
                          __high2float(b2), __half2float(__float2half2_rn(x[2]).x),
                          __bfloat162float(__float2bfloat162_rn(x[2]).y),
                          (float)sizeof(__half), (float)alignof(__half), (float)sizeof(__half2),
                          (float)alignof(__half2), (float)sizeof(__nv_bfloat16), (float)sizeof(__nv_bfloat162),
                          (float)alignof(__nv_bfloat162)};
  for (int i = 0; i < (int)(sizeof values / sizeof values[0]); ++i) out[i] = values[i];
  bits[0] = __half_as_ushort(-__float2half(x[0]));
  bits[1] = __bfloat16_as_ushort(__hneg(__float2bfloat16(x[0])));
  bits[2] = __half_as_ushort(__ushort_as_half(0x7bff));
  bits[3] = __bfloat16_as_ushort(__short_as_bfloat16((short)0xff80));
  bits[4] = (unsigned short)__half_as_short(__short_as_half((short)0x8001));
  bits[5] = __bfloat16_as_ushort(__ushort_as_bfloat16(0x7f7f));
}
"""


@pytest.fixture(scope="module")
def probe():
    return compiled(PROBE, "fp16_probe", defines=())


def special_16bit(dtype) -> numpy.ndarray:
    """Zeros, subnormals, the largest values, Inf and NaN of a 16-bit dtype, as that dtype."""
    info = ml_dtypes.finfo(dtype)
    values = [0.0, -0.0, float(info.smallest_subnormal), float(info.smallest_normal), float(info.max), -float(info.max),
              1.0, -1.0, numpy.inf, -numpy.inf, numpy.nan]
    return numpy.array(values, numpy.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_arithmetic_rounds_once_as_numpy_and_ml_dtypes_do(probe, dtype):
    """+ - * / of two 16-bit values: the float result rounded once (NumPy's float16 and ml_dtypes'
    bfloat16 compute the same way), over random pairs of every magnitude and the special values."""
    r = numpy.random.default_rng(3)
    bits = r.integers(0, 1 << 16, (2, 1 << 16), dtype=numpy.uint32).astype(numpy.uint16)
    specials = special_16bit(dtype)
    a = numpy.concatenate([bits[0].view(dtype), numpy.repeat(specials, specials.size)])
    b = numpy.concatenate([bits[1].view(dtype), numpy.tile(specials, specials.size)])
    n = a.size
    sums, differences, products, quotients = (numpy.empty(n, dtype) for _ in range(4))
    compared = numpy.empty(n, numpy.int32)
    kernel = "half_arithmetic" if dtype == F16 else "bfloat16_arithmetic"
    launch(probe, kernel, n, a, b, sums, differences, products, quotients, compared)
    with numpy.errstate(all="ignore"):
        for got, want, what in ((sums, a + b, "+"), (differences, a - b, "-"), (products, a * b, "*"),
                                (quotients, a / b, "/")):
            assert_same_16bit(got, want, f"{dtype} {what}")
    x, y = a.astype(numpy.float32), b.astype(numpy.float32)
    inf = numpy.where(numpy.isinf(x), numpy.sign(x), 0).astype(numpy.int32)
    want = ((x == y) | (x != y) << 1 | (x < y) << 2 | (x <= y) << 3 | (x > y) << 4 | (x >= y) << 5
            | numpy.isnan(x) << 6 | (inf + 1) << 7)
    numpy.testing.assert_array_equal(compared, want)


def correctly_rounded(value: float, dtype) -> numpy.ndarray:
    """value (a float64) rounded once to dtype, to nearest even, Inf past the overflow threshold: the
    neighbours of its float32 rounding compared exactly (Fraction), Inf standing at 2^maxexp."""
    with numpy.errstate(over="ignore", invalid="ignore"):
        if not numpy.isfinite(value):
            return numpy.array([value], numpy.float32).astype(dtype)
        near = int(numpy.array([value], numpy.float64).astype(numpy.float32).astype(dtype).view(numpy.uint16)[0])
    best = None
    for bits in (near - 1, near, near + 1):
        candidate = numpy.array([bits % (1 << 16)], numpy.uint16).view(dtype)
        as_float = float(candidate.astype(numpy.float32)[0])
        if numpy.isnan(as_float) or (as_float != 0 and (as_float < 0) != (value < 0)):
            continue
        if numpy.isinf(as_float):
            as_float = math.copysign(2.0 ** ml_dtypes.finfo(dtype).maxexp, as_float)
        key = (abs(Fraction(as_float) - Fraction(value)), bits & 1)  # the nearest, then the even one
        if best is None or key < best[0]:
            best = (key, candidate)
    return best[1]


def test_doubles_and_integers_round_once(probe):
    """__double2half / __double2bfloat16 (cvt.rn from f64, one rounding) and the integer constructors:
    values just off a 16-bit tie, which float rounding alone would land on exactly."""
    eps = 2.0**-40
    doubles = numpy.array([1 + 2**-11 + eps, 1 + 2**-11 - eps, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8 + eps,
                           1 + 2**-8 - eps, 1 + 2**-8, 65519.99999, 65520.0, 1e300, -1e300, 2.0**-25 + eps,
                           2.0**-25, 3e-39, 1e-50, -1 - 2**-8 - eps, numpy.inf, numpy.nan, 0.1, -123.456],
                          dtype=numpy.float64)
    ints = numpy.array([0, 1, -1, 2049, 2051, 65519, 65520, 257, 259, -257, 1 << 30, (1 << 24) + 1, 12345678, -7,
                        65504, 100000, 255, 513, 1023, 2047], dtype=numpy.int32)
    n = doubles.size
    h, b, hi, bi = (numpy.empty(n, d) for d in (F16, BF16, F16, BF16))
    launch(probe, "from_double", n, doubles, ints, h, b, hi, bi)
    with numpy.errstate(over="ignore", invalid="ignore"):
        assert_same_16bit(h, doubles.astype(F16), "double -> float16")  # (NumPy rounds doubles to float16 once)
        assert_same_16bit(hi, ints.astype(numpy.float64).astype(F16), "int -> float16")
    want_b = numpy.concatenate([correctly_rounded(float(v), BF16) for v in doubles])
    assert_same_16bit(b, want_b, "double -> bfloat16")
    assert_same_16bit(bi, numpy.concatenate([correctly_rounded(float(v), BF16) for v in ints]), "int -> bfloat16")
    # just above a tie: up, where rounding to float first would land on the tie and go to the even 1.0
    assert float(h[0]) == 1 + 2**-10 and float(b[4]) == 1 + 2**-7


def test_pairs_bit_casts_negation_sizes_and_atomics(probe):
    x = numpy.array([1.5, -2.25, 3.0], numpy.float32)
    out, bits = numpy.full(17, numpy.nan, numpy.float32), numpy.zeros(6, numpy.uint16)
    half_sum, bfloat16_sum = numpy.zeros(1, F16), numpy.zeros(1, BF16)
    probe.launch("pairs_and_atomics", 1, 64, marshal(probe, "pairs_and_atomics", (x, out, bits, half_sum, bfloat16_sum)))
    assert out.tolist() == [-2.25, 1.5, 1.5, -2.25, -2.25, 1.5, 1.5, -2.25, 3.0, 3.0, 2, 2, 4, 4, 2, 4, 4]
    assert bits.tolist() == [numpy.float16(-1.5).view(numpy.uint16), numpy.float32(-1.5).astype(BF16).view(numpy.uint16),
                             0x7BFF, 0xFF80, 0x8001, 0x7F7F]
    assert float(half_sum[0]) == 64 and float(bfloat16_sum[0]) == 64


def test_kernel_parameters_of_the_16bit_types_are_pointers(precision):
    """A kernel takes __half* and __nv_bfloat16* (8-byte pointers); a 16-bit scalar parameter is not
    emulated (a compile error naming it), nor needed: pass a float."""
    assert [(p.kind, p.size) for p in precision.kernels["cast_f32_to_bf16"].params] == [("pointer", 8)] * 2 + [("int", 8)]
    with pytest.raises(RuntimeError, match="__half or __nv_bfloat16 scalar is not emulated"):
        compiled('#include <cuda_fp16.h>\nextern "C" __global__ void scale(__half* x, __half s) { x[0] = s; }\n',
                 "fp16_scalar_parameter", defines=())


def test_the_probe_compiles_with_nvcc_against_cudas_own_headers(tmp_path):
    """What the emulator's headers let a kernel write, CUDA's let it write too (sm_80: bfloat16 arithmetic)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on this machine")
    (tmp_path / "probe.cu").write_text(PROBE)
    result = subprocess.run([nvcc, "-arch=sm_80", "-std=c++17", "-c", str(tmp_path / "probe.cu"), "-o",
                             str(tmp_path / "probe.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_conversions_keep_subnormals_under_cupys_ftz(tmp_path):
    """CuPy compiles every RawModule with -ftz=true (cupy/cuda/compiler.py), which flushes float32
    subnormals in arithmetic; precision.cu's conversions are CUDA's cvt instructions without .ftz,
    so a float32 subnormal still becomes a bfloat16 subnormal, as on the CPU."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on this machine")
    (tmp_path / "precision.cu").write_text(source("precision"))
    result = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-ftz=true", "-ptx", str(tmp_path / "precision.cu"),
                             "-o", str(tmp_path / "precision.ptx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    conversions = [line for line in (tmp_path / "precision.ptx").read_text().splitlines() if "cvt." in line
                   and ("f16" in line or "bf16" in line)]
    assert conversions and not [line for line in conversions if ".ftz" in line], conversions
