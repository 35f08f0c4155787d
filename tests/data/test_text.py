"""Character-level data, text generation and the text side of the command line."""
from __future__ import annotations

import json

import numpy
import pytest

import gpunet as gn
from gpunet.cli import main
from gpunet.data import text as text_data
from gpunet.generate import generate
from tests.support.tolerance import assert_within, layer_atol


@pytest.fixture(scope="module")
def shakespeare():
    return gn.data.load_shakespeare()


def test_shakespeare_split_in_order(shakespeare):
    raw = text_data.SHAKESPEARE.read_text(encoding="utf-8")
    assert len(raw) == 1_115_394 and shakespeare.num_classes == 65
    assert len(shakespeare.train) == 1_003_854 and len(shakespeare.val) == 111_540
    assert gn.data.decode(shakespeare.train[:30], shakespeare.vocabulary) == raw[:30]
    assert gn.data.decode(shakespeare.val[-30:], shakespeare.vocabulary) == raw[-30:]


def test_encode_decode_and_unknown_characters():
    ids = gn.data.encode("abca", "abc")
    assert ids.tolist() == [0, 1, 2, 0] and gn.data.decode(ids, "abc") == "abca"
    with pytest.raises(ValueError, match="character 'z' at position 2 is not in the model's vocabulary of 3"):
        gn.data.encode("abz", "abc")


def test_damaged_text_file_is_refused(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("not shakespeare")
    with pytest.raises(ValueError, match="input.txt: sha256 .* does not match"):
        text_data.read_text(path, text_data.SHAKESPEARE_SHA256)


def test_training_windows_are_shifted_by_one_and_seeded():
    ids = numpy.arange(1000)
    source = gn.data.CharWindows(ids, 16)
    assert len(source) == 999 // 16
    x, y = source.get(numpy.arange(5), numpy.random.default_rng(3))
    assert x.shape == y.shape == (5, 16)
    numpy.testing.assert_array_equal(y, x + 1)
    numpy.testing.assert_array_equal(numpy.diff(x, axis=1), 1)
    again, _ = source.get(numpy.arange(5), numpy.random.default_rng(3))
    numpy.testing.assert_array_equal(x, again)


def test_validation_windows_predict_every_character_once():
    ids = numpy.arange(100)
    x, y = gn.data.consecutive_windows(ids, 8)
    assert x.shape == (12, 8)
    numpy.testing.assert_array_equal(x.reshape(-1), ids[:96])
    numpy.testing.assert_array_equal(y.reshape(-1), ids[1:97])


def _text_model(kind, vocabulary):
    gn.manual_seed(0)
    if kind == "rnn":
        model = gn.models.char_rnn(len(vocabulary), 8, 16)
    else:
        model = gn.models.transformer(len(vocabulary), context=12, d_model=16, num_heads=2, num_layers=1)
    model.preprocess = gn.data.text_preprocess(vocabulary)
    return model


@pytest.mark.parametrize("kind", ["rnn", "transformer"])
def test_saved_model_generates_identically(tmp_path, kind):
    model = _text_model(kind, "abcdefgh \n")
    gn.save(model, tmp_path / "m.safetensors")
    loaded = gn.load(tmp_path / "m.safetensors")
    first = generate(model, "abc ", 40, temperature=0.9, seed=5)
    assert first.startswith("abc ") and len(first) == 44
    assert generate(loaded, "abc ", 40, temperature=0.9, seed=5) == first
    assert generate(loaded, "abc ", 40, temperature=0.9, seed=6) != first


def test_stateful_rnn_sampling_equals_rereading_the_whole_text():
    from gpunet.generate import _recurrent_sampler
    model = _text_model("rnn", "abcdefgh \n").eval()
    next_logits = _recurrent_sampler(model)  # carries the LSTM state from call to call
    ids = list(gn.data.encode("bad cab", "abcdefgh \n"))
    for step in range(25):
        carried = next_logits(ids)
        reread = model.forward(numpy.array([ids]))[0, -1]
        # one step at a time against the whole text at once: other GEMM shapes, so other summation orders
        assert_within(carried, reread, layer_atol(model, (1, len(ids)), reread), f"step {step}")
        ids.append(int(reread.argmax()))


def test_transformer_sampling_slides_its_context_window():
    model = _text_model("transformer", "abcdefgh \n")
    text = generate(model, "abcdefgh abcdefgh ", 20, temperature=0.5, seed=1)  # prompt longer than 12
    assert len(text) == 38


def test_generate_refuses_image_models_and_bad_prompts():
    with pytest.raises(ValueError, match="needs a character-level model"):
        generate(gn.models.mlp(), "x", 5)
    with pytest.raises(ValueError, match="'Z' at position 0 is not in the model's vocabulary"):
        generate(_text_model("rnn", "abc"), "Zab", 5)


@pytest.mark.parametrize("model", ["rnn", "transformer"])
def test_cli_trains_and_generates(tmp_path, capsys, model):
    out = tmp_path / model
    assert main(["train", "--model", model, "--steps", "6", "--batch-size", "4", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "nats/char" in printed and ("gradient clipping at norm 1.0" in printed)
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["step"] == 6 and 2.0 < history[-1]["val_loss"] < 4.5  # ln 65 = 4.17 at the start
    assert main(["generate", str(out / "model.safetensors"), "--prompt", "ROMEO:", "--length", "50",
                 "--seed", "2", "--device", "cpu"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("ROMEO:") and len(sample.rstrip("\n")) >= 50


def test_cli_rejects_mismatched_model_and_dataset(tmp_path):
    with pytest.raises(SystemExit, match="--model rnn needs a text dataset"):
        main(["train", "--model", "rnn", "--dataset", "mnist-sample", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--model mlp needs an image dataset"):
        main(["train", "--model", "mlp", "--dataset", "shakespeare", "--out", str(tmp_path)])


def test_cli_generate_on_an_image_model(tmp_path):
    gn.save(gn.models.mlp(), tmp_path / "m.safetensors")
    with pytest.raises(SystemExit, match="needs a character-level model"):
        main(["generate", str(tmp_path / "m.safetensors"), "--device", "cpu"])


def test_cli_eval_refuses_a_text_model(tmp_path):
    gn.save(_text_model("rnn", "ab"), tmp_path / "m.safetensors")
    with pytest.raises(SystemExit, match="is a character-level model; eval takes image classifiers"):
        main(["eval", str(tmp_path / "m.safetensors"), "--images", "i.idx", "--labels", "l.idx", "--device", "cpu"])


def test_text_training_resumes_exactly(tmp_path):
    ids = numpy.random.default_rng(0).integers(0, 10, 3000)

    def train(out, steps, resume=False):
        gn.manual_seed(0)
        model = gn.models.char_rnn(10, 4, 8, cell="gru", dropout=0.2)
        model.preprocess = gn.data.text_preprocess("0123456789")
        gn.fit(model, gn.data.CharWindows(ids, 16), gn.data.consecutive_windows(ids[:400], 16),
               optimizer=gn.optim.Adam(model, lr=1e-2), steps=steps, batch_size=4, eval_every=3, out_dir=out,
               resume=resume, progress=False, restore_best=False, clip_norm=1.0)
        return model

    straight = train(tmp_path / "a", 6)
    train(tmp_path / "b", 3)
    resumed = train(tmp_path / "b", 6, resume=True)
    for name, value in straight.params.items():
        numpy.testing.assert_array_equal(resumed.params[name], value, err_msg=name)


def test_cli_says_the_peak_rate_of_a_warm_up(tmp_path, capsys):
    """The transformer's recipe warms up over 5% of the steps: the optimizer starts at a fraction
    of its rate, and the training line gives the rate it warms up to, not that fraction."""
    assert main(["train", "--model", "transformer", "--steps", "40", "--batch-size", "2", "--device", "cpu",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert "Adam lr 0.003 after 2 warm-up steps" in capsys.readouterr().out
