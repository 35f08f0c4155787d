"""Checkpoints written by an older gpunet (commit 99498b0, before the layer protocol of issue 17)
still load and compute what they computed then; parameter and buffer names keep their order."""
from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L
from gpunet.models import char_rnn, lenet, mlp, transformer, wide_cnn
from tests.support.arrays import on
from tests.support.tolerance import assert_within, layer_atol

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"


@pytest.mark.parametrize("kind", ["mlp", "cnn", "rnn", "transformer"])
def test_old_checkpoints_load_and_reproduce_their_outputs_and_gradients(kind, device):
    model = gn.load(FIXTURES / f"{kind}.safetensors", device=device).eval()
    expected = numpy.load(FIXTURES / f"{kind}.npz")

    def assert_close(actual, desired, name):
        # the fixtures were computed on another machine (other BLAS kernels, other summation orders): each
        # array within the bound of the sums one step of the model runs, times its largest entry
        assert_within(gn.to_numpy(actual), desired, layer_atol(model, expected["x"].shape, desired), name)

    assert_close(model.forward(on(device, expected["x"])), expected["y"], "output")
    model.backward(on(device, expected["dy"]))
    names = [k[len("grad/"):] for k in expected.files if k.startswith("grad/")]
    assert list(model.params) == names  # the order optimizers and flat buffers see
    for name in names:
        assert_close(model.grads[name], expected[f"grad/{name}"], name)
    if kind == "cnn":
        assert model.preprocess["shape"] == [2, 8, 8]


def test_a_resaved_old_checkpoint_is_the_same_file_content(tmp_path):
    for kind in ("mlp", "cnn", "rnn", "transformer"):
        old = gn.training.checkpoint.read_checkpoint(FIXTURES / f"{kind}.safetensors")
        gn.save(gn.load(FIXTURES / f"{kind}.safetensors"), tmp_path / "again.safetensors")
        new = gn.training.checkpoint.read_checkpoint(tmp_path / "again.safetensors")
        assert new[2]["architecture"] == old[2]["architecture"]
        assert sorted(new[0]) == sorted(old[0])
        for key in old[0]:
            numpy.testing.assert_array_equal(new[0][key], old[0][key], err_msg=f"{kind}: {key}")


def test_ready_models_keep_their_key_order_and_descriptions():
    built = {"mlp": mlp(), "mlp_bn": mlp((6, 5, 3), batch_norm=True, dropout=0.1), "lenet": lenet(),
             "wide_cnn": wide_cnn(width=2), "char_rnn_lstm": char_rnn(5, 4, 3, "lstm", num_layers=2, dropout=0.1),
             "char_rnn_gru": char_rnn(5, 4, 3, "gru"), "char_rnn_rnn": char_rnn(5, 4, 3, "rnn"),
             "transformer": transformer(7, 6, 8, 2, num_layers=2, dropout=0.1),
             "block": L.TransformerBlock(8, 2)}
    expected = json.loads((FIXTURES / "key_order.json").read_text())
    assert sorted(built) == sorted(expected)
    for name, model in built.items():
        assert list(model.params) == expected[name]["params"], name
        assert list(model.grads) == expected[name]["params"], name
        assert list(model.buffers) == expected[name]["buffers"], name
        assert list(model.state_dict()) == expected[name]["state_dict"], name
        assert model.describe() == expected[name]["describe"], name
