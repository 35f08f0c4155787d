"""--device gpu:N / gn.device("gpu:N"): the N-th GPU CUDA shows this process, one GPU per process."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.backend import devices
from gpunet.cli import main
from tests.support.tolerance import assert_within, layer_atol, softmax_atol


@pytest.fixture(autouse=True)
def _fresh_selection(monkeypatch):
    monkeypatch.setattr(devices, "_selected_gpu", [])


@pytest.mark.gpu
def test_gpu_0_is_used_and_arrays_land_there():
    dev = gn.device("gpu:0")
    assert (dev.name, dev.index) == ("gpu", 0) and "asked for GPU 0" in dev.reason
    model = gn.models.mlp((4, 3)).to("gpu:0")
    assert model.device == "gpu" and type(model.params["0.weight"]).__module__.startswith("cupy")


@pytest.mark.gpu
def test_a_gpu_that_is_not_visible_is_one_clear_line(monkeypatch):
    count = devices.cupy_status()[0].cuda.runtime.getDeviceCount()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(RuntimeError) as exc:
        gn.device(f"gpu:{count}")
    assert str(exc.value) == (f"device 'gpu:{count}' was requested but only {count} GPU"
                              f"{'s are' if count > 1 else ' is'} visible (gpu:0"
                              f"{f' to gpu:{count - 1}' if count > 1 else ''}); CUDA_VISIBLE_DEVICES=3 renumbers "
                              "the GPUs it lists from 0")


@pytest.mark.gpu
def test_cli_gpu_index_errors_and_works(tmp_path, capsys):
    count = devices.cupy_status()[0].cuda.runtime.getDeviceCount()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--device", f"gpu:{count}", "--steps", "1", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"gpunet train: device 'gpu:{count}' was requested but only {count} GPU")
    assert not (tmp_path / "a").exists()
    images = gn.data.load_mnist_sample()[0][:3]
    model = gn.models.mlp((784, 8, 10))  # small: the stand-in emulates every kernel
    model.preprocess = gn.data.image_preprocess(images, (784,))
    gn.save(model, tmp_path / "m.safetensors")
    numpy.save(tmp_path / "i.npy", images)
    assert main(["predict", str(tmp_path / "m.safetensors"), "--images", str(tmp_path / "i.npy"),
                 "--device", "gpu:0"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()[1:]]
    classes, probabilities = model.predict(images)  # on the CPU
    assert [int(r[1]) for r in rows] == classes.tolist()
    # printed with 6 decimals (5e-7), and the GPU's kernels against the CPU's: the model's bound
    x = ((images.reshape(3, -1).astype("float64") / 255 - model.preprocess["mean"]) / model.preprocess["std"])
    logits = model.eval().forward(x.astype("float32"))
    bound = 5e-7 + 2 * layer_atol(model, x.shape, logits) * probabilities.max(axis=1) + softmax_atol(logits).max(axis=1)
    assert_within([float(r[2]) for r in rows], probabilities.max(axis=1), bound, "printed probabilities")


@pytest.mark.gpu
def test_one_gpu_per_process(monkeypatch):
    monkeypatch.setattr(devices, "_selected_gpu", [1])
    monkeypatch.setattr(devices.cupy_status()[0].cuda.runtime, "getDeviceCount", lambda: 2)
    with pytest.raises(RuntimeError, match=r"^device 'gpu:0' was requested but this process already runs on gpu:1; "
                                           r"gpunet uses one GPU per process"):
        gn.device("gpu:0")


@pytest.mark.parametrize("name", ["gpu:", "gpu:-1", "gpu:x", "cuda:0", "gpu:１"])
def test_bad_device_names(name, capsys):
    with pytest.raises(ValueError, match=r"unknown device .*; choose one of auto, cpu, gpu or gpu:N"):
        gn.device(name)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--device", name])
    assert exc.value.code == 2 and "argument --device: unknown device" in capsys.readouterr().err


def test_gpu_index_without_a_gpu(monkeypatch):
    monkeypatch.setattr(devices, "gpu_status", lambda: (False, "CuPy is not installed (test)"))
    with pytest.raises(RuntimeError, match=r"^device 'gpu:0' was requested but no GPU is usable: CuPy is not"):
        gn.device("gpu:0")
