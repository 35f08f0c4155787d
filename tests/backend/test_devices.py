"""Device selection, fallback messages, dispatch by array type, Ops signatures."""
from __future__ import annotations

import inspect
import os
import sys
import types

import numpy
import pytest

import gpunet as gn
from gpunet.backend import devices as device_module
from gpunet.backend.cupy_ops import CupyOps
from gpunet.backend.numpy_ops import NumpyOps
from gpunet.backend.ops import Ops


@pytest.mark.parametrize("subclass", [NumpyOps, CupyOps])
def test_ops_subclasses_keep_base_signatures(subclass):
    for name, member in vars(subclass).items():
        if callable(member) and not name.startswith("_"):
            assert hasattr(Ops, name), f"{subclass.__name__}.{name} has no base method in Ops"
            assert inspect.signature(member) == inspect.signature(getattr(Ops, name)), name


def test_cpu_device():
    d = gn.device("cpu")
    assert d.name == "cpu" and d.xp is numpy


def test_unknown_device_name():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        gn.device("tpu")


@pytest.fixture
def fake_cupy(monkeypatch):
    """Pretend CuPy imports but the CUDA driver is missing."""
    module = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: (_ for _ in ()).throw(RuntimeError("cudaErrorInsufficientDriver")))),
        __version__="13.6.0")
    monkeypatch.setattr(device_module, "cupy_status", lambda: (module, ""))
    device_module.gpu_status.cache_clear()
    yield module
    device_module.gpu_status.cache_clear()


def test_cupy_without_driver_falls_back_with_one_line(fake_cupy, capsys):
    assert gn.backend.has_cupy() and not gn.has_gpu()
    d = gn.device("auto")
    assert d.name == "cpu"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA driver is unusable" in err[0] and "cudaErrorInsufficientDriver" in err[0]


def test_gpu_request_without_gpu_raises_with_reason(fake_cupy):
    with pytest.raises(RuntimeError, match="no GPU is usable: CuPy is installed but the CUDA driver is unusable"):
        gn.device("gpu")


def test_no_devices_visible(monkeypatch):
    module = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 0)))
    monkeypatch.setattr(device_module, "cupy_status", lambda: (module, ""))
    device_module.gpu_status.cache_clear()
    try:
        assert gn.backend.gpu_status() == (False, "CuPy is installed but no CUDA device is visible")
    finally:
        device_module.gpu_status.cache_clear()


def test_missing_cupy_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    device_module.cupy_status.cache_clear()
    device_module.gpu_status.cache_clear()
    try:
        usable, why = device_module.gpu_status()
        assert not usable and why.startswith("CuPy is not installed")
    finally:
        device_module.cupy_status.cache_clear()
        device_module.gpu_status.cache_clear()


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("GPUNET_DEVICE", "cpu")
    d = gn.device("auto")
    assert d.name == "cpu" and d.reason == "GPUNET_DEVICE=cpu"
    monkeypatch.setenv("GPUNET_DEVICE", "npu")
    with pytest.raises(ValueError, match="GPUNET_DEVICE='npu'"):
        gn.device()


def test_mixing_devices_names_the_op():
    class FakeCupyArray:
        __module__ = "cupy._core.core"
        shape, dtype = (2, 3), numpy.dtype("float32")

    fake = FakeCupyArray()
    with pytest.raises(TypeError, match=r"Dense.forward: inputs live on different devices \(cupy.FakeCupyArray and numpy.ndarray\)"):
        gn.backend.ops_for(fake, numpy.zeros(3), op="Dense.forward")


def test_to_numpy_and_ops_for_cpu():
    a = numpy.arange(3)
    assert gn.to_numpy(a) is a
    assert gn.backend.ops_for(a).name == "cpu"


@pytest.mark.gpu
def test_gpu_arrays_dispatch_to_cupy_ops():
    import cupy
    assert gn.backend.ops_for(cupy.zeros(3)).name == "gpu"
    with pytest.raises(TypeError, match="different devices"):
        gn.backend.ops_for(cupy.zeros(3), numpy.zeros(3), op="add")


def test_kernel_compile_error_names_the_file(monkeypatch):
    from gpunet.backend import cuda_kernels

    class CompileException(Exception):
        pass

    def raw_module(code, options):
        raise CompileException("kernel.cu(3): error: identifier \"oops\" is undefined")

    fake = types.SimpleNamespace(RawModule=raw_module,
                                 cuda=types.SimpleNamespace(compiler=types.SimpleNamespace(CompileException=CompileException)))
    monkeypatch.setattr(cuda_kernels, "cupy_status", lambda: (fake, ""))
    cuda_kernels.module.cache_clear()
    try:
        with pytest.raises(cuda_kernels.KernelCompileError,
                           match=r"NVRTC could not compile gpunet/kernels/gemm.cu: .*identifier \"oops\""):
            cuda_kernels.module("gemm")
    finally:
        cuda_kernels.module.cache_clear()


def test_gpu_out_of_memory_says_to_use_a_smaller_batch():
    class OutOfMemoryError(Exception):  # the name CuPy's allocator error has
        pass

    model = gn.models.mlp((4, 3))
    original = model.forward
    model.forward = lambda x: (_ for _ in ()).throw(OutOfMemoryError("out of memory allocating 1,073,741,824 bytes"))
    x = numpy.zeros((8, 4), "float32")
    with pytest.raises(gn.train.DeviceOutOfMemory, match=r"ran out of memory in step 1 with a batch of 8 .*"
                                                         r"1,073,741,824 bytes.*try a smaller batch size"):
        gn.fit(model, (x, numpy.zeros(8, "int64")), optimizer=gn.optim.SGD(model, lr=0.1), steps=1, batch_size=8,
               progress=False)
    model.forward = original


class FakeComputeTypes:
    """cupy._core's float32 compute type as CuPy keeps it: decided from CUPY_TF32 at the first
    float32 product (`used`), settable at any time; TF32 needs compute capability 8.0."""

    def __init__(self, used: bool, capability: int = 90):
        self.linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7)
        self.capability = capability
        self.mode = (7 if int(os.environ.get("CUPY_TF32", "0")) > 0 else 1) if used else 0
        self.module = types.SimpleNamespace(_core=types.SimpleNamespace(
            _routines_linalg=self.linalg, set_compute_type=self.set, get_compute_type=self.get))

    def set(self, dtype, mode):
        assert numpy.dtype(dtype) == numpy.float32
        self.mode = 1 if mode == 7 and self.capability < 80 else mode

    def get(self, dtype):
        return self.mode


@pytest.mark.parametrize("used_before", [False, True], ids=["fresh", "cupy-used-before-gpunet"])
def test_an_inherited_cupy_tf32_does_not_change_numerics(monkeypatch, capsys, used_before):
    monkeypatch.setenv("CUPY_TF32", "1")
    monkeypatch.delenv("GPUNET_TF32", raising=False)
    fake = FakeComputeTypes(used=used_before)
    assert device_module.configure_tf32(fake.module) is False
    assert fake.mode == fake.linalg.COMPUTE_TYPE_DEFAULT  # full float32, whatever CuPy had decided
    assert capsys.readouterr().err == ""


def test_gpunet_tf32_turns_tf32_on_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setenv("GPUNET_TF32", "1")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    ampere = FakeComputeTypes(used=False)
    assert device_module.configure_tf32(ampere.module) is True and ampere.mode == 7
    volta = FakeComputeTypes(used=False, capability=70)
    assert device_module.configure_tf32(volta.module) is False  # what is in force, not what was asked


@pytest.mark.parametrize("cupy_tf32, on", [("1", True), ("0", False), (None, False)])
def test_a_cupy_without_compute_types_says_when_cupy_tf32_is_on(monkeypatch, capsys, cupy_tf32, on):
    monkeypatch.delenv("GPUNET_TF32", raising=False)
    if cupy_tf32 is None:
        monkeypatch.delenv("CUPY_TF32", raising=False)
    else:
        monkeypatch.setenv("CUPY_TF32", cupy_tf32)
    assert device_module.configure_tf32(types.SimpleNamespace()) is on
    err = capsys.readouterr().err.splitlines()
    assert len(err) == (1 if on else 0)
    assert not on or ("TF32 is on" in err[0] and "CUPY_TF32=1" in err[0])


def test_cupy_status_leaves_the_environment_alone(monkeypatch):
    monkeypatch.setenv("GPUNET_TF32", "1")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    device_module.cupy_status.cache_clear()
    try:
        device_module.cupy_status()
        assert "CUPY_TF32" not in os.environ  # the mode is set in CuPy (configure_tf32), not inherited by children
    finally:
        device_module.cupy_status.cache_clear()


@pytest.mark.gpu
def test_the_gpu_backend_applies_the_tf32_mode_and_keys_its_gemm_choices_by_it():
    ops = gn.backend.ops_for_device("gpu")
    assert ops.tf32 is False  # GPUNET_TF32 is not set in the test suite
    assert ops._gemm_dispatch().key.split("|")[1] == "fp32"


def test_each_kernel_function_is_looked_up_once_and_scalars_are_marshalled_in_launch(monkeypatch):
    from gpunet.backend import cuda_kernels

    lookups, calls = [], []

    class FakeModule:
        def get_function(self, name):
            lookups.append(name)
            return lambda grid, block, args: calls.append((grid, block, args))

    monkeypatch.setattr(cuda_kernels, "module", lambda family: FakeModule())
    cuda_kernels.kernel.cache_clear()
    try:
        for _ in range(3):
            cuda_kernels.launch("gemm", "some_kernel", 2, (7, 2.5, True, numpy.int64(9)))
    finally:
        cuda_kernels.kernel.cache_clear()
    assert lookups == ["some_kernel"] and len(calls) == 3
    grid, block, args = calls[0]
    assert grid == (2,) and block == (cuda_kernels.THREADS,)
    assert [type(a) for a in args] == [numpy.int32, numpy.float32, numpy.int32, numpy.int64]


def test_a_launch_without_blocks_or_over_the_y_limit_is_refused(monkeypatch):
    from gpunet.backend import cuda_kernels

    assert cuda_kernels.blocks_for(0) == 0 and cuda_kernels.blocks_for(1) == 1
    monkeypatch.setattr(cuda_kernels, "kernel", lambda family, name: pytest.fail("launched"))
    with pytest.raises(ValueError, match=r"kernel gemm.k: grid \(0,\) has no blocks"):
        cuda_kernels.launch("gemm", "k", cuda_kernels.blocks_for(0), ())
    with pytest.raises(ValueError, match="gridDim.y 65536 is over the limit 65535"):
        cuda_kernels.launch("gemm", "k", (1, 65536), ())
    assert cuda_kernels.grid_2d(3, 10**6) == (3, 65535)


def test_kernel_sources_are_found_from_a_source_tree(monkeypatch):
    from gpunet.backend import cuda_kernels

    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(cuda_kernels.resources, "files", not_installed)
    assert "gemm_bias_act" in cuda_kernels.source("gemm")
    with pytest.raises(FileNotFoundError, match="nothing.cu is missing"):
        cuda_kernels.source("nothing")
