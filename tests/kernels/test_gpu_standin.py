"""The CuPy stand-in behaves like CuPy where gpunet could lean on NumPy by mistake, marshals
kernel arguments as CuPy does, and refuses what a real GPU refuses. These test the harness itself,
so they run only where the stand-in is the GPU (on a real GPU the real CuPy is under test)."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from tests.support.arrays import ON_STANDIN

pytestmark = pytest.mark.skipif(not ON_STANDIN, reason="tests the CuPy stand-in, which a real GPU replaces")

SOURCE = r"""
extern "C" __global__ void axpb(const float* x, float* y, float a, int n, long long stride) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) y[i] = a * x[i] + 1.f;
}
"""


@pytest.fixture(scope="module")
def axpb():
    import cupy

    return cupy.RawModule(code=SOURCE).get_function("axpb")


def device_array(values):
    import cupy

    return cupy.asarray(numpy.asarray(values, dtype="float32"))


def test_host_and_device_arrays_do_not_mix():
    x = device_array([1.0, 2.0])
    host = numpy.ones(2, "float32")
    for mixed in (lambda: x + host, lambda: host + x, lambda: numpy.multiply(x, host)):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            mixed()
    with pytest.raises(TypeError, match=r"linear: inputs live on different devices \(cupy.ndarray and numpy"):
        gn.backend.ops_for(x, host, op="linear")


def test_no_implicit_conversion_and_explicit_copies_are_counted():
    import cupy

    x = device_array([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        numpy.asarray(x)
    before = dict(cupy.COUNTERS)
    total = x.sum()
    assert isinstance(total, cupy.ndarray) and total.shape == ()  # a reduction stays on the device
    assert cupy.COUNTERS["d2h"] == before["d2h"]
    assert float(total) == 6.0 and cupy.COUNTERS["d2h"] == before["d2h"] + 1
    host = gn.to_numpy(x)
    assert isinstance(host, numpy.ndarray) and cupy.COUNTERS["d2h"] == before["d2h"] + 2
    host[0] = 100.0  # a copy: the device memory is untouched
    assert float(x[0]) == 1.0


def test_views_launch_nothing_and_kernels_count_once():
    import cupy

    x = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    before = dict(cupy.COUNTERS)
    x.T, x[1], x.reshape(4, 3), x[:, 1:]
    assert cupy.COUNTERS["launches"] == before["launches"]
    cupy.exp(x), x * 2, x.sum(axis=0), cupy.ascontiguousarray(x.T)
    assert cupy.COUNTERS["launches"] == before["launches"] + 4


def test_kernel_arguments_are_marshalled_as_cupy_does(axpb):
    x, y = device_array(numpy.arange(5)), device_array(numpy.zeros(5))
    axpb((1,), (32,), (x, y, numpy.float32(2.0), numpy.int32(5), numpy.int64(32)))
    numpy.testing.assert_array_equal(y.get(), 2.0 * numpy.arange(5) + 1.0)
    # A Python int is 8 bytes and a Python float a double: a GPU would read garbage; here it is an error.
    for args, what in [((x, y, numpy.float32(2.0), 5, numpy.int64(32)), "argument 3: the kernel takes a 4-byte int"),
                       ((x, y, 2.0, numpy.int32(5), numpy.int64(32)), "argument 2: the kernel takes a 4-byte float"),
                       ((x, y, numpy.float32(2.0), True, numpy.int64(32)), "Python bool"),
                       ((x, None, numpy.float32(2.0), numpy.int32(5), numpy.int64(32)), "None as a kernel argument"),
                       ((x, y, numpy.float32(2.0), numpy.float32(5), numpy.int64(32)), "got float32"),
                       ((x, numpy.zeros(5, "float32"), numpy.float32(2), numpy.int32(5), 32), "host numpy.ndarray"),
                       ((x, y, numpy.float32(2.0), numpy.int32(5)), "takes 5 arguments, got 4")]:
        with pytest.raises(TypeError, match=what):
            axpb((1,), (32,), args)


def test_grid_and_block_must_be_tuples_as_in_cupy(axpb):
    x, y = device_array([1.0]), device_array([0.0])
    with pytest.raises(TypeError, match="grid and block must be tuples"):
        axpb(1, (32,), (x, y, numpy.float32(1), numpy.int32(1), numpy.int64(1)))


def test_cupy_functions_refuse_host_arrays_and_keep_layouts():
    import cupy

    host = numpy.ones((2, 3), "float32")
    for call in (lambda: cupy.exp(host), lambda: cupy.add.at(host, [0], 1.0), lambda: cupy.ascontiguousarray(host),
                 lambda: cupy.empty_like(host)):
        with pytest.raises(TypeError, match="Unsupported type"):
            call()
    fortran = cupy.asarray(numpy.asfortranarray(host))
    assert cupy.empty_like(fortran).flags.f_contiguous and not cupy.empty_like(fortran).flags.c_contiguous


@pytest.mark.parametrize("grid, block, shared, limit", [
    ((1,), (1025,), 0, "1025"), ((1, 65536), (32,), 0, "65536"), ((0,), (32,), 0, "0"), ((1,), (0,), 0, "0"),
    ((1,), (32,), 49 * 1024, "50176")])
def test_launches_a_gpu_would_refuse_are_refused(axpb, grid, block, shared, limit):
    from tests.cuda.emulator import LaunchError

    x, y = device_array([1.0]), device_array([0.0])
    with pytest.raises(LaunchError, match=limit):
        axpb(grid, block, (x, y, numpy.float32(1), numpy.int32(1), numpy.int64(1)), shared_mem=shared)
    assert float(y[0]) == 0.0  # nothing ran


def test_gpunet_takes_the_stand_in_as_its_gpu():
    dev = gn.device("gpu")
    assert dev.name == "gpu" and dev.xp.STANDIN
    assert "stand-in" in gn.backend.devices.gpu_name()
    assert any("GPU usable: yes" in line for line in gn.backend.device_info())


def test_a_kernel_reading_past_the_end_of_an_array_faults():
    import cupy
    from tests.cuda.emulator import KernelFault

    read_at = cupy.RawModule(code=r"""
extern "C" __global__ void read_at(const float* x, float* y, int i) { y[0] = x[i]; }
""").get_function("read_at")
    x, y = device_array([1.0, 2.0, 3.0, 4.0, 5.0]), device_array([0.0])
    read_at((1,), (1,), (x, y, numpy.int32(4)))
    assert float(y[0]) == 5.0
    with pytest.raises(KernelFault, match="invalid memory access"):
        read_at((1,), (1,), (x, y, numpy.int32(5)))  # one past the end: the buffer's guard page
    for result in (x * 2, cupy.empty((3, 2), dtype=cupy.float32), x.copy()):  # op results are guarded too
        with pytest.raises(KernelFault, match="invalid memory access"):
            read_at((1,), (1,), (result, y, numpy.int32(result.size)))
