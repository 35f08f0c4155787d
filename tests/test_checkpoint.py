"""save/load: round trips, atomic writes, and clear errors for bad files (never unpickling)."""
from __future__ import annotations

import os
import pickle

import numpy
import pytest

import gpunet as gn
from gpunet import layers as L


def model_with_everything():
    model = gn.Sequential(L.Dense(6, 8), L.BatchNorm1d(8), L.GELU(), L.Dropout(0.2), L.LayerNorm(8),
                          L.Dense(8, 3, activation="tanh"), L.Softmax())
    model.preprocess = {"kind": "image", "scale": 1 / 255, "mean": 0.1, "std": 0.3, "shape": [6]}
    model.forward(numpy.random.default_rng(0).standard_normal((5, 6)).astype("float32"))  # running stats move
    return model.eval()


def test_round_trip_rebuilds_architecture_weights_and_preprocessing(tmp_path):
    model = model_with_everything()
    gn.save(model, tmp_path / "m.safetensors")
    loaded = gn.load(tmp_path / "m.safetensors").eval()
    assert loaded.describe() == model.describe() and loaded.preprocess == model.preprocess
    for key, value in model.state_dict().items():
        numpy.testing.assert_array_equal(loaded.state_dict()[key], value)
    x = numpy.random.default_rng(1).standard_normal((4, 6)).astype("float32")
    numpy.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PICKLE_RAN",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="pickle or a torch.save zip.*never unpickles"):
        gn.load(path)
    assert not (tmp_path / "PICKLE_RAN").exists()


def test_torch_save_file_is_refused(tmp_path):
    import torch
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="never unpickles"):
        gn.load(path)


@pytest.mark.parametrize("cut", [5, 50, -7])
def test_truncated_or_corrupt_files(tmp_path, cut):
    gn.save(model_with_everything(), tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(raw[:cut])
    with pytest.raises(ValueError, match=r"bad.safetensors: corrupt or truncated safetensors file"):
        gn.load(tmp_path / "bad.safetensors")


def test_foreign_and_mismatched_files(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": numpy.zeros(2, "float32")}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a gpunet checkpoint"):
        gn.load(tmp_path / "foreign.safetensors")
    model = gn.models.mlp((4, 3, 2))
    gn.save(model, tmp_path / "m.safetensors")
    from safetensors.numpy import load_file
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), "np") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "m.safetensors"))
    tensors["0.weight"] = numpy.zeros((3, 5), "float32")
    save_file(tensors, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"mismatch.safetensors: checkpoint does not match its architecture.*'0.weight' has shape \(3, 4\), got \(3, 5\)"):
        gn.load(tmp_path / "mismatch.safetensors")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        gn.load(tmp_path / "nope.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    gn.save(gn.models.mlp((4, 3, 2)), path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        gn.save(gn.models.mlp((4, 3, 2)), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_load_state_dict_copies_the_arrays():
    source = gn.models.mlp((4, 3))
    target = gn.models.mlp((4, 3)).load_state_dict(source.state_dict())
    target.params["0.weight"][...] = 7.0
    assert not (source.params["0.weight"] == 7.0).any()
