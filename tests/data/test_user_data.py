"""`gpunet train --data PATH`: a folder of .npy or IDX images and labels, or a UTF-8 text file, with
the built-in sets' checks and one-line errors."""
from __future__ import annotations

import json

import numpy
import pytest

import gpunet as gn
from gpunet.cli import main


def blobs(n=240, size=12, seed=0):
    """Three classes of 12x12 uint8 images: a bright bar in one of three rows, on noise."""
    r = numpy.random.default_rng(seed)
    y = r.integers(0, 3, n).astype("uint8")
    x = r.integers(0, 60, (n, size, size)).astype("uint8")
    for i, label in enumerate(y):
        x[i, 2 + 4 * label : 4 + 4 * label, :] = 250
    return x, y


def train(argv, capsys=None):
    return main(["train", "--steps", "30", "--device", "cpu", "--no-progress", "--batch-size", "32", *argv])


def test_npy_folder_trains_an_mlp_for_its_image_size(tmp_path, capsys):
    x, y = blobs()
    data = tmp_path / "data"
    data.mkdir()
    numpy.save(data / "train_images.npy", x[:200])
    numpy.save(data / "train_labels.npy", y[:200].astype("int64"))
    out = tmp_path / "run"
    assert train(["--data", str(data), "--out", str(out), "--lr", "0.003"]) == 0
    text = capsys.readouterr().out
    assert f"training mlp on {data}: 180 train / 20 validation samples" in text  # --val-fraction 0.1, seeded
    model = gn.load(out / "model.safetensors")
    assert model.preprocess["shape"] == [144] and model.layers[0].config["in_features"] == 144
    assert model.layers[-1].config["out_features"] == 3
    classes, _ = model.predict(x[200:])  # held-back images, raw uint8 as in the files
    assert (classes == y[200:]).mean() > 0.9  # the bars are easy: an independent check that it learned
    # the same folder again: resume compares the data by path, and a changed path is refused
    assert train(["--data", str(data), "--out", str(out), "--steps", "35", "--resume"]) == 0


def test_idx_folder_with_validation_files_and_the_cnn(tmp_path, capsys):
    x, y = gn.data.load_mnist_sample()
    data = tmp_path / "mnist-like"
    data.mkdir()
    gn.data.write_idx(data / "train_images.idx.gz", x[:300])
    gn.data.write_idx(data / "train_labels.idx.gz", y[:300])
    gn.data.write_idx(data / "val_images.idx", x[300:350])
    gn.data.write_idx(data / "val_labels.idx", y[300:350])
    assert train(["--model", "cnn", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "3"]) == 0
    assert "300 train / 50 validation samples" in capsys.readouterr().out
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    model = gn.load(tmp_path / "run" / "model.safetensors")
    expected = gn.evaluate(model, x[300:350], y[300:350].astype("int64"))
    assert history[-1]["val_loss"] == pytest.approx(expected["loss"], rel=1e-5)  # validated on val_* exactly


def test_text_file_trains_a_character_model(tmp_path, capsys):
    text = "".join(numpy.random.default_rng(0).choice(list("abcé \n"), 3000))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--model", "rnn", "--data", str(tmp_path / "corpus.txt"), "--steps", "2", "--device", "cpu",
                 "--no-progress", "--out", str(out)]) == 0
    model = gn.load(out / "model.safetensors")
    assert model.preprocess == {"kind": "text", "vocabulary": "".join(sorted(set(text)))}
    assert f"training rnn on {tmp_path / 'corpus.txt'}: 42 train" in capsys.readouterr().out  # 2700 chars / 64


def folder(tmp_path, **files):
    data = tmp_path / "d"
    data.mkdir(exist_ok=True)
    for name, array in files.items():
        if name.endswith(".npy"):
            numpy.save(data / name, array)
        else:
            gn.data.write_idx(data / name, array)
    return data


X, Y = blobs(40)
CASES = {
    "no labels": (dict(**{"train_images.npy": X}), "no train_labels file in it (train_labels.npy or"),
    "count": (dict(**{"train_images.npy": X, "train_labels.npy": Y[:30]}), "has 40 images but"),
    "floats 0..1": (dict(**{"train_images.npy": X / 255.0, "train_labels.npy": Y}),
                    "train_images.npy: float images in [0, 1], but this model takes raw pixel values 0..255"),
    "range": (dict(**{"train_images.npy": X.astype("int32") * 3, "train_labels.npy": Y}),
              "train_images.npy: pixel values must be in 0..255"),
    "nan": (dict(**{"train_images.npy": numpy.where(X >= 250, numpy.nan, X), "train_labels.npy": Y}),
            "train_images.npy: images contains NaN or Inf"),
    "negative label": (dict(**{"train_images.npy": X, "train_labels.npy": Y.astype("int64") - 1}),
                       "train_labels.npy: labels must be class numbers 0, 1, 2, ...; found -1"),
    "fractional label": (dict(**{"train_images.npy": X, "train_labels.npy": Y + 0.5}),
                         "train_labels.npy: labels must be whole class numbers"),
    "2-d labels": (dict(**{"train_images.npy": X, "train_labels.npy": Y[:, None]}),
                   "train_labels.npy: labels must be one number per image"),
    "two formats": (dict(**{"train_images.npy": X, "train_images.idx": X, "train_labels.npy": Y}),
                    "both train_images.npy and train_images.idx are there"),
    "half validation": (dict(**{"train_images.npy": X, "train_labels.npy": Y, "val_images.npy": X}),
                        "val_images is there but not its val_labels"),
    "val shape": (dict(**{"train_images.npy": X, "train_labels.npy": Y, "val_images.npy": X[:, :6],
                          "val_labels.npy": Y}), "val_images.npy: images of shape (6, 12), but the training"),
    "one class": (dict(**{"train_images.npy": X, "train_labels.npy": Y * 0}), "every label is 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_folders_end_in_one_line(tmp_path, capsys, case):
    files, message = CASES[case]
    data = folder(tmp_path, **files)
    with pytest.raises(SystemExit) as exc:
        train(["--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("gpunet train: ") and message in err, err
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


@pytest.mark.parametrize("argv, message, code", [
    (["--data", "{d}", "--dataset", "mnist"], "--data trains on your own files; --dataset", 2),
    (["--data", "{d}/nothing"], "--data {d}/nothing: no such file or folder", 1),
    (["--data", "{d}/train_images.npy"], "is a file, but an image model takes a folder", 1),
    (["--model", "rnn", "--data", "{d}"], "is a folder, but a character model takes a UTF-8 text file", 1),
    (["--model", "cnn", "--data", "{d}"], "images of shape (12, 12) do not fit this model's input (1, 28, 28)", 1),
])
def test_data_that_does_not_fit_the_model(tmp_path, capsys, argv, message, code):
    data = folder(tmp_path, **{"train_images.npy": X, "train_labels.npy": Y})
    with pytest.raises(SystemExit) as exc:
        train([a.format(d=data) for a in argv] + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == code and message.format(d=data) in err, err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    (b"caf\xe9 au lait" * 40, "not UTF-8 text (byte 3 is b'\\xe9')"),
    ("short".encode(), "5 characters leave 4 for training, too few for windows of 64"),
    (("x" * 600).encode(), "600 characters leave 60 for validation, too few for windows of 64"),
])
def test_bad_text_files(tmp_path, capsys, content, message):
    (tmp_path / "t.txt").write_bytes(content)
    with pytest.raises(SystemExit):
        main(["train", "--model", "transformer", "--data", str(tmp_path / "t.txt"), "--steps", "1", "--device", "cpu",
              "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
