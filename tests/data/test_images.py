"""IDX reading, the embedded sample, MNIST download from a local server, batching."""
from __future__ import annotations

import functools
import hashlib
import http.server
import re
import threading
from pathlib import Path

import numpy
import pytest

import gpunet as gn
from gpunet.data import mnist

SAMPLE = Path(gn.data.datasets.SAMPLE_DIR)


def test_embedded_sample_is_the_documented_real_digits():
    x, y = gn.data.load_mnist_sample()
    assert x.shape == (8000, 28, 28) and x.dtype == numpy.uint8 and y.shape == (8000,)
    assert numpy.bincount(y).tolist() == [773, 905, 834, 803, 788, 723, 756, 813, 787, 818]
    digest = hashlib.sha256((SAMPLE / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert digest == "46cd6f8a41fbd4a4eebd6f320a16f7b964302f4e3a8f35d05a3bb227a8cd63b0"


@pytest.mark.parametrize("suffix", [".idx", ".idx.gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (numpy.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == "uint8":
        a = numpy.abs(a).astype(dtype)
    gn.data.write_idx(tmp_path / f"a{suffix}", a)
    b = gn.data.read_idx(tmp_path / f"a{suffix}")
    assert b.dtype == numpy.dtype(dtype) and b.dtype.isnative
    numpy.testing.assert_array_equal(a, b)


def header(code, dims):
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize("payload, message", [
    (b"\x00\x00", "too short for an IDX header"),
    (b"\x01\x02\x08\x01" + b"\x00" * 8, "bad IDX magic 0x01020801"),
    (header(0x07, [2]) + b"\x00\x00", "unknown IDX type code 0x07"),
    (bytes([0, 0, 8, 0]), "zero dimensions"),
    (bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02", "truncated IDX header"),
    (header(0x08, [2, 3]) + b"\x00" * 5, "dimensions (2, 3) of uint8 need 6 data bytes, found 5"),
    (header(0x0C, [2]) + b"\x00" * 9, "dimensions (2,) of int32 need 8 data bytes, found 9"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip data"),
])
def test_bad_idx_files_name_the_file_and_problem(tmp_path, payload, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        gn.data.read_idx(path)


def test_truncated_gzip_sample(tmp_path):
    path = tmp_path / "cut.idx.gz"
    path.write_bytes((SAMPLE / "train-labels-idx1-ubyte.gz").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt gzip data"):
        gn.data.read_idx(path)


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving the sample files under the official names."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes((SAMPLE / "train-labels-idx1-ubyte.gz").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_checksum_mismatch_leaves_no_file(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"checksum mismatch \(md5 [0-9a-f]{32}, expected ec29112dd5afa0611ce80d1b7f02629c\)"):
        gn.data.download_file("t10k-labels-idx1-ubyte.gz", cache, [server])
    assert list(cache.iterdir()) == []


def test_download_tries_the_next_mirror_and_verifies(server, tmp_path, monkeypatch):
    served = (SAMPLE / "train-labels-idx1-ubyte.gz").read_bytes()
    monkeypatch.setitem(mnist.MNIST_FILES, "t10k-labels-idx1-ubyte.gz", (len(served), hashlib.md5(served).hexdigest()))
    cache = tmp_path / "cache"
    path = gn.data.download_file("t10k-labels-idx1-ubyte.gz", cache, [server + "missing/", server])
    assert path.read_bytes() == served and sorted(p.name for p in cache.iterdir()) == [path.name]


def test_missing_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run with --download"):
        gn.data.load_mnist(tmp_path)


def test_mirror_list_from_environment(monkeypatch):
    monkeypatch.setenv("GPUNET_MNIST_MIRRORS", "http://a/, http://b/")
    assert mnist.mirrors() == ["http://a/", "http://b/"]


def test_minibatches_cover_every_sample_once_in_seeded_order():
    a = list(gn.data.minibatches(10, 4, numpy.random.default_rng(1)))
    b = list(gn.data.minibatches(10, 4, numpy.random.default_rng(1)))
    assert [len(i) for i in a] == [4, 4, 2]
    assert sorted(numpy.concatenate(a).tolist()) == list(range(10))
    assert all((x == y).all() for x, y in zip(a, b))
    assert [i.tolist() for i in gn.data.minibatches(10, 4, numpy.random.default_rng(1), start=2)] == [a[2].tolist()]


def test_random_shift_moves_pixels_and_fills_zeros():
    img = numpy.zeros((1, 5, 5), "uint8")
    img[0, 2, 2] = 9
    out = gn.data.random_shift(numpy.repeat(img, 50, 0), 1, numpy.random.default_rng(0))
    positions = {tuple(numpy.argwhere(o)[0]) for o in out}
    assert positions <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)} and len(positions) > 4
    assert (out.sum(axis=(1, 2)) == 9).all()


def test_preprocess_standardises_raw_images():
    x, _ = gn.data.load_mnist_sample()
    spec = gn.data.image_preprocess(x, (784,))
    out = gn.data.apply_preprocess(spec, x[:500])
    assert out.dtype == numpy.float32 and out.shape == (500, 784)
    assert abs(out.mean()) < 0.05 and abs(out.std() - 1) < 0.05
    with pytest.raises(ValueError, match="does not hold images of shape"):
        gn.data.apply_preprocess(spec, numpy.zeros((3, 10), "uint8"))
