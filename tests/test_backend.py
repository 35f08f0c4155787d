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


def test_tf32_is_opt_in(monkeypatch):
    monkeypatch.delenv("CUPY_TF32", raising=False)
    monkeypatch.delenv("GPUNET_TF32", raising=False)
    device_module.cupy_status.cache_clear()
    device_module.cupy_status()
    assert "CUPY_TF32" not in os.environ
    monkeypatch.setenv("GPUNET_TF32", "1")
    device_module.cupy_status.cache_clear()
    try:
        device_module.cupy_status()
        assert os.environ["CUPY_TF32"] == "1"
    finally:
        os.environ.pop("CUPY_TF32", None)
        device_module.cupy_status.cache_clear()


def test_kernel_sources_are_found_from_a_source_tree(monkeypatch):
    from gpunet.backend import cuda_kernels

    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(cuda_kernels.resources, "files", not_installed)
    assert "gemm_bias_act" in cuda_kernels.source("gemm")
    with pytest.raises(FileNotFoundError, match="nothing.cu is missing"):
        cuda_kernels.source("nothing")
