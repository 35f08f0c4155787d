"""Issue 13, parts 3 and 4: every input validated at the edge, every user error one line on stderr
(exit 2 for a wrong command line, 1 for the rest), --debug / GPUNET_DEBUG=1 for the traceback."""
from __future__ import annotations

import math
import pathlib

import numpy
import pytest

import gpunet as gn
from gpunet.generate import generate
from tests.support.reliability import cli, one_error_line, snapshot


@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "inf"], "argument --lr: must be positive and finite, got 'inf'"),
    (["train", "--lr", "nan"], "argument --lr: must be positive and finite, got 'nan'"),
    (["train", "--lr", "abc"], "argument --lr: must be positive and finite, got 'abc'"),
    (["train", "--clip-norm", "-1"], "argument --clip-norm: must be non-negative and finite, got '-1'"),
    (["train", "--clip-norm", "nan"], "argument --clip-norm: must be non-negative and finite, got 'nan'"),
    (["train", "--val-fraction", "1"], "argument --val-fraction: must be a number strictly between 0 and 1"),
    (["train", "--val-fraction", "nan"], "argument --val-fraction: must be a number strictly between 0 and 1"),
    (["train", "--seed", "-1"], "argument --seed: must be an integer from 0 to"),
    (["train", "--seed", str(2**64)], "argument --seed: must be an integer from 0 to"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["train", "--epochs", "1.5"], "argument --epochs: must be a positive integer, got '1.5'"),
    (["train", "--model", "rnn", "--dataset", "mnist-sample"], "--model rnn needs a text dataset"),
    (["generate", "m.safetensors", "--temperature", "nan"], "argument --temperature: must be non-negative and finite"),
    (["generate", "m.safetensors", "--temperature", "-1"], "argument --temperature: must be non-negative and finite"),
    (["generate", "m.safetensors", "--length", "-5"], "argument --length: must be a non-negative integer"),
    (["eval", "m.safetensors", "--images", "i", "--labels", "l", "--batch-size", "0"], "argument --batch-size"),
    (["bench", "--repeats", "0"], "argument --repeats: must be a positive integer"),
    ([], "the following arguments are required: command"),
])
def test_bad_command_lines_exit_2_in_one_line_and_touch_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and message in line and line.startswith("gpunet")
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, message", [
    (lambda m: gn.optim.Adam(m, lr=math.nan), "Adam: lr must be positive and finite, got nan"),
    (lambda m: gn.optim.SGD(m, lr=math.inf), "SGD: lr must be positive and finite, got inf"),
    (lambda m: gn.optim.SGD(m, lr=0.1, momentum=-0.5), "SGD: momentum must be at least 0, got -0.5"),
    (lambda m: gn.optim.Adam(m, betas=(1.0, 0.9)), "Adam: betas[0] must be less than 1, got 1"),
    (lambda m: gn.optim.AdamW(m, eps=0.0), "AdamW: eps must be greater than 0, got 0"),
    (lambda m: gn.optim.Adam(m, weight_decay=math.nan), "Adam: weight_decay must be a finite number, got nan"),
    (lambda m: gn.optim.clip_grad_norm(m, -1.0), "clip_grad_norm: max_norm must be greater than 0, got -1"),
    (lambda m: gn.optim.CosineLR(gn.optim.SGD(m, 0.1), t_max=3, eta_min=-1), "CosineLR: eta_min must be at least 0"),
    (lambda m: gn.optim.StepLR(gn.optim.SGD(m, 0.1), step_size=0), "StepLR: step_size must be a positive integer"),
])
def test_optimizer_arguments_are_checked(make, message):
    model = gn.models.mlp((3, 2))
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make(model)
    assert all((model.params[k] == v).all() for k, v in before.items())


def small(n=40):
    r = numpy.random.default_rng(0)
    x = r.standard_normal((n, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "fit: batch_size must be a positive integer, got 0"),
    ({"clip_norm": -1.0}, "fit: clip_norm must be at least 0, got -1"),
    ({"clip_norm": math.nan}, "fit: clip_norm must be a finite number, got nan"),
    ({"seed": -1}, "fit: seed must be a non-negative integer, got -1"),
    ({"eval_every": 0}, "fit: eval_every must be a positive integer, got 0"),
    ({"steps": 0, "epochs": None}, "fit: steps must be a positive integer, got 0"),
    ({"loss": "hinge"}, "fit: unknown loss 'hinge'"),
])
def test_fit_arguments_are_checked_before_any_work(kwargs, message, tmp_path):
    model = gn.models.mlp((4, 2))
    before = {k: v.copy() for k, v in model.params.items()}
    args = {"epochs": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        gn.fit(model, small(), optimizer=gn.optim.SGD(model, 0.1), out_dir=tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    assert all((model.params[k] == v).all() for k, v in before.items())


def test_non_finite_validation_data_and_empty_data_are_refused(tmp_path):
    model = gn.models.mlp((4, 2))
    x, y = small()
    bad = x.copy()
    bad[3, 1] = numpy.inf
    opt = gn.optim.SGD(model, 0.1)
    with pytest.raises(ValueError, match=r"validation data: input contains NaN or Inf \(first at index \(3, 1\)\)"):
        gn.fit(model, (x, y), (bad, y), optimizer=opt, epochs=1, out_dir=tmp_path / "o")
    targets = numpy.zeros((40, 2), "float32")
    targets[5, 0] = numpy.nan
    with pytest.raises(ValueError, match=r"training data: targets contains NaN or Inf \(first at index \(5, 0\)\)"):
        gn.fit(model, (x, targets), optimizer=opt, epochs=1, loss="mse")
    with pytest.raises(ValueError, match="training data: holds no samples"):
        gn.fit(model, (x[:0], y[:0]), optimizer=opt, epochs=1)
    with pytest.raises(ValueError, match="evaluate: holds no samples"):
        gn.evaluate(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="evaluate: batch_size must be a positive integer, got 0"):
        gn.evaluate(model, x, y, batch_size=0)
    assert not (tmp_path / "o").exists()


def test_generate_arguments_are_checked():
    model = gn.models.char_rnn(3, 4, 8)
    model.preprocess = gn.data.text_preprocess("abc")
    with pytest.raises(ValueError, match="generate: temperature must be a finite number, got nan"):
        generate(model, "ab", 5, temperature=math.nan)
    with pytest.raises(ValueError, match="generate: length must be a non-negative integer, got -1"):
        generate(model, "ab", -1)
    assert generate(model, "ab", 5, temperature=1e-300) == generate(model, "ab", 5, temperature=0)  # greedy, not NaN


@pytest.fixture
def image_model(tmp_path):
    x, y = gn.data.load_mnist_sample()
    model = gn.models.mlp((784, 10))
    model.preprocess = gn.data.image_preprocess(x[:500], (784,))
    gn.fit(model, (x[:500], y[:500].astype("int64")), optimizer=gn.optim.Adam(model, 1e-2), steps=8, batch_size=64,
           progress=False)
    gn.save(model, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors", x[-50:], y[-50:]


def eval_cli(tmp_path, capsys, images, labels, checkpoint=None):
    gn.data.write_idx(tmp_path / "i.idx", images)
    gn.data.write_idx(tmp_path / "l.idx", labels)
    return cli(["eval", checkpoint or tmp_path / "m.safetensors", "--images", tmp_path / "i.idx", "--labels",
                tmp_path / "l.idx", "--device", "cpu"], capsys)


def test_float_images_in_0_1_are_refused_with_a_hint_and_0_255_scored_the_same(image_model, tmp_path, capsys):
    _, x, y = image_model
    code, text, _ = eval_cli(tmp_path, capsys, x, y)
    as_uint8 = text.strip().splitlines()[-1]
    code, text, _ = eval_cli(tmp_path, capsys, x.astype("float32"), y)
    assert code == 0 and text.strip().splitlines()[-1] == as_uint8
    code, _, err = eval_cli(tmp_path, capsys, x.astype("float32") / 255, y)
    line = one_error_line(err)
    assert code == 1 and f"{tmp_path / 'i.idx'}: float images in [0, 1]" in line and "multiply them by 255" in line


@pytest.mark.parametrize("images, labels, message", [
    (lambda x: x, lambda y: numpy.where(numpy.arange(len(y)) == 7, 10, y), "l.idx: label 10 at index (7,) is outside the model's 10 classes (0..9)"),
    (lambda x: x, lambda y: numpy.full(len(y), -1, "int8"), "l.idx: label -1 at index (0,) is outside"),
    (lambda x: x, lambda y: numpy.zeros((len(y), 2), "uint8"), "l.idx: labels must be one number per image"),
    (lambda x: x[:0], lambda y: y[:0], "i.idx: holds no images"),
    (lambda x: x[:, :20, :20], lambda y: y, "i.idx: images of shape (20, 20) do not fit the model's input (784,)"),
    (lambda x: numpy.where(numpy.arange(784).reshape(28, 28) == 30, numpy.nan, x.astype("float32")), lambda y: y,
     "i.idx: images contains NaN or Inf (first at index (0, 1, 2))"),
    (lambda x: x.astype("int16") * 2, lambda y: y, "i.idx: pixel values must be in 0..255"),
])
def test_bad_eval_data_is_one_line_naming_the_file(image_model, tmp_path, capsys, images, labels, message):
    _, x, y = image_model
    before = snapshot(tmp_path)
    code, text, err = eval_cli(tmp_path, capsys, images(x), labels(y))
    assert code == 1 and message in one_error_line(err) and "accuracy" not in text
    assert snapshot(tmp_path)["m.safetensors"] == before["m.safetensors"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "nope.safetensors: no such checkpoint file"),
    (lambda p: p.mkdir(), "nope.safetensors is a folder, not a checkpoint file"),
    (lambda p: p.write_bytes(b"\x80\x04K\x01."), "is a pickle or a torch.save zip, not a safetensors file"),
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1"), "corrupt or truncated safetensors file"),
    (lambda p: p.write_bytes(b""), "corrupt or truncated safetensors file"),
])
def test_bad_checkpoint_files_are_one_line(tmp_path, capsys, setup, message):
    path = tmp_path / "nope.safetensors"
    setup(path)
    before = snapshot(tmp_path)
    for argv in (["eval", path, "--images", "i", "--labels", "l"], ["generate", path]):
        code, _, err = cli(argv + ["--device", "cpu"], capsys)
        line = one_error_line(err)
        assert code == 1 and message in line and line.startswith(f"gpunet {argv[0]}: ")
    assert snapshot(tmp_path) == before


def test_unreadable_file_is_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.safetensors"
    gn.save(gn.models.mlp((4, 2)), path)
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)  # root reads a chmod-000 file: simulate it
    code, _, err = cli(["generate", path, "--device", "cpu"], capsys)
    assert code == 1 and one_error_line(err) == f"gpunet generate: {path}: permission denied"


@pytest.mark.parametrize("payload, message", [
    (None, "i.idx: no such IDX file"),
    (b"\x01\x02\x08\x01" + b"\x00" * 8, "bad IDX magic 0x01020801"),
    (bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02", "truncated IDX header"),
    (bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x00" * 3, "need 5 data bytes, found 3"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip data"),
])
def test_bad_idx_files_through_eval(image_model, tmp_path, capsys, payload, message):
    if payload is not None:
        (tmp_path / "i.idx").write_bytes(payload)
    gn.data.write_idx(tmp_path / "l.idx", numpy.zeros(3, "uint8"))
    code, _, err = cli(["eval", tmp_path / "m.safetensors", "--images", tmp_path / "i.idx", "--labels",
                        tmp_path / "l.idx", "--device", "cpu"], capsys)
    assert code == 1 and message in one_error_line(err)


@pytest.mark.parametrize("name, value, message", [
    ("GPUNET_DEVICE", "tpu", "environment variable GPUNET_DEVICE='tpu' is not one of auto, cpu, gpu"),
    ("GPUNET_TF32", "yes", "environment variable GPUNET_TF32='yes' is not one of 0, 1"),
    ("GPUNET_GEMM", "fast", "environment variable GPUNET_GEMM='fast' is not one of auto, fused, cublas, cublaslt"),
    ("GPUNET_DATA", "", "GPUNET_DATA is set but empty"),
    ("GPUNET_MNIST_MIRRORS", "ftp://x/", "GPUNET_MNIST_MIRRORS: 'ftp://x/' is not an http(s) URL"),
])
def test_bad_environment_variables_are_one_line(tmp_path, monkeypatch, capsys, name, value, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    code, _, err = cli(["train", "--steps", "1", "--device", "cpu"], capsys)
    assert code == 1 and message in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_gpunet_data_naming_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("GPUNET_DATA", str(tmp_path / "f"))
    code, _, err = cli(["train", "--dataset", "mnist", "--device", "cpu", "--out", tmp_path / "o"], capsys)
    assert code == 1 and f"GPUNET_DATA='{tmp_path / 'f'}' names a file, not a folder" in one_error_line(err)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_and_keeps_the_exit_status(tmp_path, monkeypatch, capsys, how):
    argv = ["eval", tmp_path / "nope.safetensors", "--images", "i", "--labels", "l", "--device", "cpu"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("GPUNET_DEBUG", "1")
    code, _, err = cli(argv, capsys)
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == f"gpunet eval: {tmp_path / 'nope.safetensors'}: no such checkpoint file"


def test_generate_from_a_model_with_non_finite_weights_is_refused(tmp_path, capsys):
    model = gn.models.char_rnn(3, 4, 8)
    model.preprocess = gn.data.text_preprocess("abc")
    model.params["2.bias"][:] = numpy.nan
    gn.save(model, tmp_path / "m.safetensors")
    code, out, err = cli(["generate", tmp_path / "m.safetensors", "--prompt", "ab", "--device", "cpu"], capsys)
    assert code == 1 and out == ""
    assert one_error_line(err) == (f"gpunet generate: {tmp_path / 'm.safetensors'}: the model's output holds NaN or "
                                   "Inf (are its weights finite?); nothing can be sampled")


def test_data_dir_naming_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    before = snapshot(tmp_path)
    code, out, err = cli(["train", "--dataset", "mnist", "--data-dir", "f", "--device", "cpu"], capsys)
    assert code == 1 and one_error_line(err) == "gpunet train: --data-dir f is a file, not a folder"
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_an_unexpected_error_is_still_one_line_and_says_how_to_see_more(monkeypatch, capsys):
    def broken(args):
        raise KeyError("vocabulary")

    monkeypatch.setattr("gpunet.cli.cmd_info", broken)
    code, _, err = cli(["info"], capsys)
    assert code == 1 and one_error_line(err) == ("gpunet info: internal error: KeyError: 'vocabulary' (run again with "
                                                 "--debug for the traceback, and please report it)")


@pytest.mark.parametrize("name, value, expected", [
    ("GPUNET_GEMM", "FUSED", "fused"), ("GPUNET_GEMM", " cuBLAS ", "cublas"), ("GPUNET_GEMM", None, "auto"),
    ("GPUNET_TF32", " 1", "1"), ("GPUNET_TF32", "", "0"), ("GPUNET_DEVICE", "CPU\n", "cpu"),
    ("GPUNET_DEBUG", "1 ", "1"), ("GPUNET_DEBUG", "  ", "0"),
])
def test_environment_choices_are_read_by_one_rule(monkeypatch, name, value, expected):
    from gpunet import validate

    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    validate.environment()  # what validation lets through...
    assert validate.env_choice(name) == expected  # ...is what every reader gets


def test_an_environment_choice_out_of_range_is_the_one_line_error(monkeypatch):
    from gpunet import validate

    monkeypatch.setenv("GPUNET_DEBUG", "true")
    with pytest.raises(ValueError) as exc:
        validate.env_choice("GPUNET_DEBUG")
    assert str(exc.value) == ("environment variable GPUNET_DEBUG='true' is not one of 0, 1 (unset it or set one of "
                              "those)")


def test_gpunet_tf32_with_spaces_turns_tf32_on(monkeypatch):
    from gpunet.backend import devices
    from tests.backend.test_devices import FakeComputeTypes

    monkeypatch.setenv("GPUNET_TF32", " 1")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    ampere = FakeComputeTypes(used=False)
    assert devices.configure_tf32(ampere.module) is True and ampere.mode == 7


@pytest.mark.parametrize("value, debug", [(" 1", True), ("true", False)])
def test_gpunet_debug_is_read_as_validation_reads_it(tmp_path, monkeypatch, capsys, value, debug):
    monkeypatch.setenv("GPUNET_DEBUG", value)
    code, _, err = cli(["eval", tmp_path / "nope.safetensors", "--images", "i", "--labels", "l", "--device", "cpu"],
                       capsys)
    assert code == 1 and ("Traceback" in err) == debug
    if not debug:
        assert one_error_line(err) == ("gpunet eval: environment variable GPUNET_DEBUG='true' is not one of 0, 1 "
                                       "(unset it or set one of those)")


@pytest.mark.gpu
def test_gpunet_gemm_in_capitals_is_taken_by_the_gpu_backend(monkeypatch):
    from gpunet.backend.cupy_ops import CupyOps

    monkeypatch.setenv("GPUNET_GEMM", "FUSED")
    assert CupyOps().gemm_mode == "fused"
