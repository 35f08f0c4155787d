"""The 16-bit storage ops on every device against the CPU's, bit for bit: to_16bit (float32 into
ml_dtypes.bfloat16 or float16, rounding to nearest even), from_16bit (exact) and round_16bit (the
float32 value a 16-bit store keeps). On the CPU they are the base Ops' NumPy and ml_dtypes casts;
on the GPU kernels/precision.cu (the stand-in runs it in the kernel emulator). A NaN is compared as a
NaN: the GPU writes the canonical NaN where NumPy and ml_dtypes keep a NaN's sign and payload."""
from __future__ import annotations

import ml_dtypes
import numpy
import pytest

import gpunet as gn
from gpunet.backend import ops_for_device
from tests import gpu_standin
from tests.kernels.test_fp16_emulation import float32_sample
from tests.support.arrays import ON_STANDIN, on

CPU = ops_for_device("cpu")
KINDS = {"bf16": numpy.dtype(ml_dtypes.bfloat16), "fp16": numpy.dtype(numpy.float16)}


@pytest.fixture(scope="module")
def sample():
    """Every bfloat16, float16 ties and their neighbours, the edges and random float32 patterns."""
    return float32_sample(random_count=1 << 16).view(numpy.float32)


def assert_same(got, want, what: str) -> None:
    """The same dtype and shape, every value bit for bit, a NaN as a NaN."""
    got = gn.to_numpy(got)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = numpy.isnan(want.astype(numpy.float32))
    assert (numpy.isnan(got.astype(numpy.float32)) == nan).all(), f"{what}: NaNs differ"
    unsigned = numpy.uint16 if want.dtype.itemsize == 2 else numpy.uint32
    wrong = numpy.flatnonzero((got.view(unsigned) != want.view(unsigned)) & ~nan)
    assert wrong.size == 0, f"{what}: {wrong.size} values differ, the first at {wrong[0]}"


@pytest.mark.parametrize("kind", KINDS)
def test_to_16bit_rounds_as_the_cpu(device, sample, kind):
    got = ops_for_device(device).to_16bit(on(device, sample), kind)
    assert_same(got, CPU.to_16bit(sample, kind), f"to_16bit {kind}")
    assert gn.to_numpy(got).dtype == KINDS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_round_16bit_is_the_cpus_value(device, sample, kind):
    got = ops_for_device(device).round_16bit(on(device, sample), kind)
    want = CPU.round_16bit(sample, kind)
    assert_same(got, want, f"round_16bit {kind}")
    with numpy.errstate(over="ignore", invalid="ignore"):  # what the CPU reference is: NumPy's / ml_dtypes' cast
        assert_same(want, sample.astype(KINDS[kind]).astype(numpy.float32), "the reference")


@pytest.mark.parametrize("kind", KINDS)
def test_from_16bit_of_every_16bit_value_is_exact(device, kind):
    every = numpy.arange(1 << 16, dtype=numpy.uint32).astype(numpy.uint16).view(KINDS[kind]).reshape(256, 256)
    got = ops_for_device(device).from_16bit(on(device, every))
    assert_same(got, CPU.from_16bit(every), f"from_16bit {kind}")
    assert_same(CPU.from_16bit(every), every.astype(numpy.float32), "the reference")


@pytest.mark.parametrize("kind", KINDS)
def test_any_shape_layout_or_size(device, kind):
    """2-D and 3-D shapes kept; a non-contiguous input (the base Ops' cast on the GPU) and an empty one
    give the CPU's result too."""
    ops = ops_for_device(device)
    x = numpy.random.default_rng(1).standard_normal((5, 7, 9)).astype(numpy.float32) * 1e3
    for a in (x, x[:, ::2], x.transpose(2, 0, 1), x[:0], x.reshape(35, 9)[:, :0]):
        assert_same(ops.to_16bit(on(device, a), kind), CPU.to_16bit(a, kind), f"to_16bit {a.shape}")
        assert_same(ops.round_16bit(on(device, a), kind), CPU.round_16bit(a, kind), f"round_16bit {a.shape}")
        sixteen = CPU.to_16bit(a, kind)
        assert_same(ops.from_16bit(on(device, sixteen)), CPU.from_16bit(sixteen), f"from_16bit {a.shape}")


def test_wrong_dtypes_and_kinds_are_refused(device):
    ops = ops_for_device(device)
    with pytest.raises(TypeError, match="to_16bit takes a float32 array, got float64"):
        ops.to_16bit(on(device, numpy.ones(3)), "bf16")
    with pytest.raises(TypeError, match="from_16bit takes a bfloat16 or float16 array, got float32"):
        ops.from_16bit(on(device, numpy.ones(3, numpy.float32)))
    for op in (ops.to_16bit, ops.round_16bit):
        with pytest.raises(ValueError, match="the 16-bit kind must be 'bf16' or 'fp16', got 'fp32'"):
            op(on(device, numpy.ones(3, numpy.float32)), "fp32")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_STANDIN, reason="counts the stand-in's launches")
@pytest.mark.parametrize("kind", KINDS)
def test_each_op_is_one_kernel_launch_on_the_gpu(kind):
    ops = ops_for_device("gpu")
    x = on("gpu", numpy.ones((3, 5), numpy.float32))
    sixteen = ops.to_16bit(x, kind)
    for run in (lambda: ops.to_16bit(x, kind), lambda: ops.round_16bit(x, kind), lambda: ops.from_16bit(sixteen)):
        with gpu_standin.counting() as launched:
            run()
        assert launched["raw_launches"] == 1 and launched["launches"] == 1
