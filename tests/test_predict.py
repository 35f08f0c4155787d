"""model.predict on raw inputs (through the model's stored preprocessing) and `gpunet predict`."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.cli import main
from tests.support.tolerance import assert_within, layer_atol, softmax_atol

IMAGES = gn.data.load_mnist_sample()[0][:50]


def image_model():
    gn.manual_seed(0)
    model = gn.models.mlp((784, 32, 10), dropout=0.3)
    model.preprocess = gn.data.image_preprocess(IMAGES, (784,))
    return model


def reference(model, images):
    """Softmax of the logits of (images / 255 - mean) / std, in float64 on the host."""
    spec = model.preprocess
    x = ((images.reshape(len(images), -1).astype("float64") / 255 - spec["mean"]) / spec["std"]).astype("float32")
    logits = model.eval().forward(x).astype("float64")
    e = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_predict_applies_the_stored_preprocessing(device):
    model = image_model()
    expected, bound = reference(model, IMAGES), probabilities_atol(model, IMAGES)
    model.to(device).train()
    classes, probabilities = model.predict(IMAGES, batch_size=7)  # uint8 images as stored, several batches
    assert model.training  # its mode is given back
    assert classes.dtype == numpy.int64 and classes.shape == (50,)
    assert probabilities.dtype == numpy.float32 and probabilities.shape == (50, 10)
    assert_within(probabilities, expected, bound, "probabilities")
    numpy.testing.assert_array_equal(classes, expected.argmax(axis=1))


def probabilities_atol(model, images):
    """Each side's logits within the bound of the model's sums (tolerance.layer_atol); a shift of at most
    d in every logit moves p_i by at most 2 d p_i; then the softmax's own bound."""
    x = ((images.reshape(len(images), -1).astype("float64") / 255 - model.preprocess["mean"])
         / model.preprocess["std"]).astype("float32")
    logits = model.eval().forward(x).astype("float64")
    p = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return 2 * layer_atol(model, x.shape, logits) * p + softmax_atol(logits, axis=1)


def test_predict_of_a_character_model_gives_a_class_per_position():
    model = gn.models.char_rnn(7, embedding_dim=4, hidden_size=5)
    model.preprocess = gn.data.text_preprocess("abcdefg")
    ids = numpy.random.default_rng(0).integers(0, 7, (3, 6))
    classes, probabilities = model.predict(ids)
    logits = model.forward(ids).astype("float64")
    e = numpy.exp(logits - logits.max(axis=-1, keepdims=True))
    assert_within(probabilities, e / e.sum(axis=-1, keepdims=True), softmax_atol(logits), "probabilities")
    assert classes.shape == (3, 6)


@pytest.mark.parametrize("inputs, message", [
    (IMAGES.astype("float32") / 255, r"predict: inputs: float images in \[0, 1\], but this model takes raw pixel"),
    (IMAGES[:, :20, :20], r"predict: inputs: images of shape \(20, 20\) do not fit the model's input \(784,\)"),
    (IMAGES[:0], "predict: inputs: holds no samples"),
    (numpy.array(3), "predict: inputs must be a batch"),
])
def test_predict_refuses_inputs_in_one_line(inputs, message):
    with pytest.raises(ValueError, match=message):
        image_model().predict(inputs)


def test_cli_predict_prints_classes_and_probabilities(tmp_path, capsys):
    model = image_model()
    gn.save(model, tmp_path / "model.safetensors")
    numpy.save(tmp_path / "images.npy", IMAGES[:6])
    gn.data.write_idx(tmp_path / "images.idx.gz", IMAGES[:6])
    expected = reference(model, IMAGES[:6])
    for images in ("images.npy", "images.idx.gz"):
        assert main(["predict", str(tmp_path / "model.safetensors"), "--images", str(tmp_path / images),
                     "--top", "2", "--device", "cpu"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].split("\t") == ["image", "class", "probability", "class", "probability"]
        assert len(lines) == 7
        for i, line in enumerate(lines[1:]):
            index, first, p_first, second, p_second = line.split("\t")
            order = numpy.argsort(-expected[i])
            assert (int(index), int(first), int(second)) == (i, order[0], order[1])
            # printed with 6 decimals (5e-7); the same float32 logits on both sides, the softmax's own bound 1e-7
            assert float(p_first) == pytest.approx(expected[i, order[0]], abs=1e-6)
            assert float(p_second) == pytest.approx(expected[i, order[1]], abs=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.npy", "missing.npy: no such file"),
    (lambda d: (numpy.save(d / "o.npy", numpy.array([{}]), allow_pickle=True), d / "o.npy")[1],
     "o.npy: holds Python objects, not a plain NumPy array"),
    (lambda d: (numpy.save(d / "f.npy", IMAGES[:2] / 255.0), d / "f.npy")[1], "f.npy: float images in [0, 1]"),
    (lambda d: (numpy.save(d / "s.npy", IMAGES[:2, :10]), d / "s.npy")[1],
     "s.npy: images of shape (10, 28) do not fit the model's input (784,)"),
    (lambda d: (numpy.save(d / "t.npy", numpy.array(["a", "b"])), d / "t.npy")[1], "t.npy: images must be an array"),
    (lambda d: (numpy.save(d / "u.npy", numpy.array([["a", "b"]])), d / "u.npy")[1],
     "u.npy: images must hold numbers (pixel values 0..255), got dtype <U1"),
    (lambda d: ((d / "x.idx").write_bytes(b"not idx"), d / "x.idx")[1], "x.idx: "),
])
def test_cli_predict_errors_are_one_line(tmp_path, capsys, make, message):
    gn.save(image_model(), tmp_path / "model.safetensors")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "model.safetensors"), "--images", str(make(tmp_path)), "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpunet predict: ") and message in err


def test_cli_predict_refuses_a_character_model(tmp_path, capsys):
    model = gn.models.char_rnn(5, 4, 4)
    model.preprocess = gn.data.text_preprocess("abcde")
    gn.save(model, tmp_path / "m.safetensors")
    numpy.save(tmp_path / "i.npy", IMAGES[:2])
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "m.safetensors"), "--images", str(tmp_path / "i.npy")])
    assert "is a character-level model; predict takes image classifiers" in capsys.readouterr().err
