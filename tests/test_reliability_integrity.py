"""Issue 13, parts 5 and 6: integrity (per-tensor checksums, verified dataset caches, streaming
IDX reads with bounded memory, writes that fail cleanly) and valid output (strict JSON, 0666 less
the umask, one-point plots with markers, no global matplotlib state)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tracemalloc

import numpy
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import gpunet as gn
from gpunet.data import mnist
from tests.support.reliability import FullDisk, cli, one_error_line, snapshot

TRAIN = ["train", "--steps", "2", "--device", "cpu", "--no-progress"]


def saved_model(path):
    gn.save(gn.models.mlp((4, 3, 2)), path)
    return path


def test_a_flipped_byte_is_refused_naming_file_and_tensor(tmp_path, capsys):
    path = saved_model(tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor's data
    path.write_bytes(bytes(raw))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"m.safetensors: tensor '2.weight' does not match its checksum .* damaged"):
        gn.load(path)
    code, _, err = cli(["generate", path, "--device", "cpu"], capsys)
    assert code == 1 and "tensor '2.weight' does not match its checksum" in one_error_line(err)
    assert snapshot(tmp_path) == before


def test_checkpoints_without_checksums_still_load(tmp_path):
    path = saved_model(tmp_path / "m.safetensors")
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    meta.pop("checksums")
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    old, new = gn.load(tmp_path / "old.safetensors"), gn.load(path)
    for name, value in new.params.items():
        numpy.testing.assert_array_equal(old.params[name], value)


def test_a_tensor_added_after_saving_is_refused(tmp_path):
    path = saved_model(tmp_path / "m.safetensors")
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["__extra__/smuggled"] = numpy.zeros(3, "float32")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"tensor '__extra__/smuggled' has no checksum"):
        gn.training.checkpoint.read_checkpoint(path)


def test_a_half_written_last_checkpoint_is_one_line_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(TRAIN + ["--out", out], capsys)[0] == 0
    last = out / "last.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = snapshot(out)
    code, _, err = cli(TRAIN[:2] + ["4", "--device", "cpu", "--no-progress", "--out", out, "--resume"], capsys)
    assert code == 1 and f"{last}: corrupt or truncated safetensors file" in one_error_line(err)
    assert snapshot(out) == before


def test_a_full_disk_is_one_line_and_keeps_every_old_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli(TRAIN + ["--out", out], capsys)[0] == 0
    before = snapshot(out)
    # the disk fills up at the first checkpoint write of the resumed run (a mocked write: no tmpfs needed)
    monkeypatch.setattr("gpunet.files.os.fdopen", lambda fd, mode: FullDisk(fd))
    code, _, err = cli(TRAIN[:2] + ["4", "--device", "cpu", "--no-progress", "--out", out, "--resume"], capsys)
    line = one_error_line(err)
    assert code == 1 and line in (f"gpunet train: {out / 'model.safetensors'}: no space left on the device",
                                  f"gpunet train: {out / 'last.safetensors'}: no space left on the device")
    assert snapshot(out) == before  # no temporary left, nothing replaced


@pytest.fixture
def mnist_cache(tmp_path, monkeypatch):
    """The sample's files under the official names, with the official sizes and md5s replaced by theirs."""
    sample = gn.data.datasets.SAMPLE_DIR
    folder = tmp_path / "cache" / "mnist"
    folder.mkdir(parents=True)
    for name in mnist.MNIST_FILES:
        source = sample / ("train-images-idx3-ubyte.gz" if "images" in name else "train-labels-idx1-ubyte.gz")
        data = source.read_bytes()
        (folder / name).write_bytes(data)
        monkeypatch.setitem(mnist.MNIST_FILES, name, (len(data), hashlib.md5(data).hexdigest()))
    return folder


def test_cached_mnist_is_verified_once_and_again_after_a_change(mnist_cache, monkeypatch, capsys):
    reads = []
    real_md5sum = mnist.md5sum
    monkeypatch.setattr(mnist, "md5sum", lambda path: reads.append(path.name) or real_md5sum(path))
    gn.data.load_mnist(mnist_cache.parent)
    assert sorted(reads) == sorted(mnist.MNIST_FILES)  # first use: every file checked
    assert set(json.loads((mnist_cache / ".verified.json").read_text())) == set(mnist.MNIST_FILES)
    gn.data.load_mnist(mnist_cache.parent)
    assert len(reads) == 4  # verified files are not re-read
    path = mnist_cache / "t10k-labels-idx1-ubyte.gz"
    size, md5 = mnist.MNIST_FILES[path.name]
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF  # copied over with a damaged byte: same size, another mtime
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(1, 1))
    with pytest.raises(ValueError, match=rf"{path}: md5 [0-9a-f]{{32}} does not match the official {md5}"):
        gn.data.load_mnist(mnist_cache.parent)
    path.write_bytes(bytes(raw[:-10]))
    code, _, err = cli(["train", "--dataset", "mnist", "--data-dir", mnist_cache.parent, "--device", "cpu",
                        "--out", mnist_cache.parent / "run"], capsys)
    assert code == 1 and f"{path}: {size - 10} bytes, but the official file has {size}" in one_error_line(err)


def test_read_idx_refuses_more_data_than_declared_with_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.idx.gz"
    bomb.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(20 << 20), 9))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{bomb}: dimensions \(10,\) of uint8 need 10 data bytes, found {20 << 20}"):
            gn.data.read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # 20 MiB inflated, a few MiB held at most


def test_read_idx_refuses_a_header_the_file_cannot_hold_before_reading(tmp_path):
    path = tmp_path / "liar.idx.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28))))
    with pytest.raises(ValueError, match=r"need 47040000 data bytes, more than this \d+-byte gzip file can hold"):
        gn.data.read_idx(path)
    plain = tmp_path / "liar.idx"
    plain.write_bytes(bytes([0, 0, 0x0C, 1]) + (2**31).to_bytes(4, "big") + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"need 8589934592 data bytes, found 8"):
        gn.data.read_idx(plain)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_are_created_0666_less_the_umask(tmp_path, capsys, umask, mode):
    old = os.umask(umask)
    try:
        assert cli(TRAIN + ["--out", tmp_path / "run"], capsys)[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes == {name: mode for name in modes} and len(modes) == 5


def test_history_json_is_strict_with_nulls_and_diverged_marks(tmp_path):
    history = gn.History([{"step": 1, "epoch": 1, "train_loss": 0.5, "val_loss": 0.4},
                          {"step": 2, "epoch": 1, "train_loss": float("inf"), "val_loss": float("nan")}])
    history.write(tmp_path)
    records = json.loads((tmp_path / "history.json").read_text(), parse_constant=pytest.fail)
    assert records[0] == {"step": 1, "epoch": 1, "train_loss": 0.5, "val_loss": 0.4}
    assert records[1] == {"step": 2, "epoch": 1, "train_loss": None, "val_loss": None, "diverged": True}
    assert (tmp_path / "metrics.csv").read_text().splitlines()[2] == "2,1,,,True"


def test_one_point_plot_has_markers_and_no_global_matplotlib_state(tmp_path):
    import matplotlib

    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    history = gn.History([{"step": 3, "epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9}])
    figure = history.figure()
    assert all(line.get_marker() == "o" for ax in figure.axes for line in ax.lines)
    history.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]


def test_unicode_checkpoint_paths(tmp_path):
    path = saved_model(tmp_path / "模型 ✓ é.safetensors")
    assert sorted(gn.load(path).params) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_a_header_length_whose_first_byte_looks_like_a_pickle_still_loads(tmp_path):
    # the first byte of a safetensors file is the low byte of its header length: 0x80 is not a pickle
    model = gn.models.mlp((4, 3, 2))
    for pad in range(256):
        model.preprocess = {"kind": "image", "scale": 1 / 255, "mean": 0.0, "std": 1.0, "shape": [4], "pad": "x" * pad}
        gn.save(model, tmp_path / "m.safetensors")
        if (tmp_path / "m.safetensors").read_bytes()[:1] == b"\x80":
            break
    assert (tmp_path / "m.safetensors").read_bytes()[:1] == b"\x80"
    assert gn.load(tmp_path / "m.safetensors").preprocess["pad"] == "x" * pad
