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


# --- held to CuPy 14 (issue 27): each of these differed from CuPy before ----------------------------
def test_the_stand_in_reports_cupy_14():
    import cupy

    assert cupy.__version__.startswith("14.") and cupy.__version__.endswith("+gpunet.standin")


def test_using_allocator_routes_every_allocation_inside_it_and_only_there():
    import cupy

    pool = cupy.cuda.MemoryPool()
    outside = cupy.zeros(7, dtype=cupy.float32)
    with cupy.cuda.using_allocator(pool.malloc):
        made = [cupy.empty((10,), dtype=cupy.float32), outside * 2, cupy.asarray(numpy.arange(3))]
        with pytest.raises(ValueError, match="Can't change the global allocator inside `using_allocator`"):
            cupy.cuda.set_allocator(None)
    assert pool.total_bytes() == 40 + 28 + 24 and pool.allocations == 3
    cupy.ones(5)  # after the block: the default allocator again
    assert pool.total_bytes() == 92 and [m.size for m in made] == [10, 7, 3]


def test_set_checks_dtype_shape_and_type_as_cupy_does():
    import cupy

    a = cupy.zeros(4, dtype=cupy.float32)
    with pytest.raises(TypeError, match="^float64 array cannot be set to float32 array$"):
        a.set(numpy.zeros(4))  # (it cast silently before)
    with pytest.raises(ValueError, match=r"^Shape mismatch. Old shape: \(4,\), new shape: \(1,\)$"):
        a.set(numpy.zeros(1, dtype=numpy.float32))  # (it broadcast silently before)
    with pytest.raises(TypeError, match="^Only numpy.ndarray can be set to cupy.ndarray$"):
        a.set([1.0, 2.0, 3.0, 4.0])
    a.set(numpy.arange(4, dtype=numpy.float32))
    numpy.testing.assert_array_equal(a.get(), [0, 1, 2, 3])


def test_the_compute_type_gpunet_sets_makes_float32_products_tf32(monkeypatch):
    import cupy
    from cupy._core import _routines_linalg as linalg

    from gpunet.backend import devices

    a = numpy.float32([[1 + 2**-12, 1 + 2**-11 + 2**-12, 3.0]])  # 2**-12: below TF32's half ulp at 1
    b = numpy.float32([[1.0], [1.0], [2**-13]])
    x, w = cupy.asarray(a), cupy.asarray(b)
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.setenv("GPUNET_TF32", "1")
    try:
        assert devices.configure_tf32(cupy) is True and cupy._core.get_compute_type(numpy.float32) == 7
        tf32 = numpy.float32([[1.0, 1 + 2**-10, 3.0]]) @ numpy.float32([[1.0], [1.0], [2**-13]])
        for product in (x @ w, cupy.matmul(x, w), x.dot(w), cupy.tensordot(x, w, 1)):
            numpy.testing.assert_array_equal(product.get(), tf32)
        assert float((x.astype(cupy.float64) @ w.astype(cupy.float64))[0, 0]) == (a.astype(float) @ b.astype(float))[0, 0]
    finally:
        monkeypatch.setenv("GPUNET_TF32", "0")
        assert devices.configure_tf32(cupy) is False
    assert linalg.compute_types[2] == linalg.COMPUTE_TYPE_DEFAULT
    numpy.testing.assert_array_equal((x @ w).get(), a @ b)  # full float32 again


def test_a_host_copy_in_a_capture_fails_by_default_and_replays_stale_data_as_cupy_records_it():
    import cupy

    from tests.gpu_standin import cupy_faithful_capture

    scale, offset = numpy.float32([2.0, 3.0]), numpy.array(1.0, dtype=numpy.float32)  # host values a step reads each time
    x = cupy.asarray(numpy.float32([10.0, 20.0]))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureUnsupported: a host-to-device copy"):
            cupy.asarray(scale)  # the stand-in's default: stricter than CuPy
        stream.end_capture()
        with cupy_faithful_capture():
            stream.begin_capture()
            y = x * cupy.asarray(scale) + cupy.asarray(offset)  # CuPy: a staged async copy, a frozen fill
            graph = stream.end_capture()
    scale[:], offset[...] = [5.0, 7.0], 100.0  # the next step's values, on the host
    graph.launch()
    numpy.testing.assert_array_equal(y.get(), [21.0, 61.0])  # the replay used capture's: 10*2+1, 20*3+1
    assert (y.get() != x.get() * scale + offset).all()  # not what the step meant: [150, 240]
