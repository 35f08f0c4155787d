"""The command line: train, eval, info, and argument errors (exit 2 with usage)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy
import pytest

import gpunet as gn
from gpunet.cli import main


def test_train_then_eval_on_idx_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--steps", "60", "--device", "cpu", "--out", str(out), "--no-progress", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "device: cpu" in text and "total" in text and "1,068,810" in text and "wrote" in text
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["step"] == 60 and {"epoch", "train_loss", "val_loss", "val_accuracy"} <= set(history[-1])
    x, y = gn.data.load_mnist_sample()
    gn.data.write_idx(tmp_path / "images.idx.gz", x[:300])
    gn.data.write_idx(tmp_path / "labels.idx", y[:300])
    assert main(["eval", str(out / "model.safetensors"), "--images", str(tmp_path / "images.idx.gz"),
                 "--labels", str(tmp_path / "labels.idx"), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"accuracy", "loss", "samples"} and result["samples"] == 300
    assert result["accuracy"] > 0.8  # 60 steps already learn most digits
    model = gn.load(out / "model.safetensors")
    expected = gn.evaluate(model, x[:300], y[:300].astype("int64"))
    assert result["accuracy"] == pytest.approx(expected["accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nope"], "invalid choice: 'nope'"),
    (["train", "--epochs", "0"], "must be a positive integer"),
    (["train", "--epochs", "2", "--steps", "3"], "not allowed with argument"),
    (["train", "--lr", "-1"], "must be positive"),
    (["eval", "m.safetensors"], "the following arguments are required: --images, --labels"),
    ([], "the following arguments are required: command"),
])
def test_bad_arguments_exit_2_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gpunet" in err and message in err


def test_info_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "gpunet", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "gpunet 0.1.0" in result.stdout and "GPU usable:" in result.stdout and "auto picks:" in result.stdout


def test_eval_mismatched_files(tmp_path):
    gn.save(gn.models.mlp(), tmp_path / "m.safetensors")
    gn.data.write_idx(tmp_path / "i.idx", numpy.zeros((3, 28, 28), "uint8"))
    gn.data.write_idx(tmp_path / "l.idx", numpy.zeros(2, "uint8"))
    with pytest.raises(SystemExit, match="has 3 images but .* has 2 labels"):
        main(["eval", str(tmp_path / "m.safetensors"), "--images", str(tmp_path / "i.idx"),
              "--labels", str(tmp_path / "l.idx"), "--device", "cpu"])


def test_cnn_train_and_eval(tmp_path, capsys):
    out = tmp_path / "cnn"
    assert main(["train", "--model", "cnn", "--steps", "30", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    assert "Conv2D(1, 8, kernel_size=3, stride=1, padding=1)" in capsys.readouterr().out  # wide_cnn(width=8)
    x, y = gn.data.load_mnist_sample()
    gn.data.write_idx(tmp_path / "i.idx", x[-200:])
    gn.data.write_idx(tmp_path / "l.idx", y[-200:])
    assert main(["eval", str(out / "model.safetensors"), "--images", str(tmp_path / "i.idx"),
                 "--labels", str(tmp_path / "l.idx"), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 200 and result["accuracy"] > 0.5


def test_gpu_requested_without_one_exits_with_the_reason(monkeypatch):
    # Wherever the suite runs there is a GPU or the stand-in: make it unusable, as on a CPU machine.
    monkeypatch.setattr(gn.backend.devices, "gpu_status", lambda: (False, "CuPy is not installed (test)"))
    for argv in (["train", "--device", "gpu", "--steps", "1"], ["bench", "--device", "gpu", "--tiny"]):
        with pytest.raises(SystemExit, match=rf"gpunet {argv[0]}: device 'gpu' was requested but no GPU is usable: "):
            main(argv)
