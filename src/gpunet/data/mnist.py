"""MNIST: the four official files, downloaded only when asked, md5-checked, written atomically.

A cached file (downloaded, or copied in by hand) is verified, size and md5, on its first use and
again whenever its size or modification time changes; what was verified is remembered in
`.verified.json` beside the files, so later runs do not re-read them.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path

import numpy

from gpunet import paths
from gpunet.data.idx import read_idx
from gpunet.files import atomic_write, tmp_name

VERIFIED = ".verified.json"

# name -> (bytes, md5) of the official files
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c"),
}
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


def cache_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """data_dir, else $GPUNET_DATA, else $XDG_CACHE_HOME/gpunet, else ~/.cache/gpunet."""
    return Path(data_dir) if data_dir else paths.data_dir()


def mirrors() -> list[str]:
    """Mirror base URLs: $GPUNET_MNIST_MIRRORS (comma-separated) or the defaults."""
    env = os.environ.get("GPUNET_MNIST_MIRRORS", "").strip()
    return [m.strip() for m in env.split(",") if m.strip()] if env else list(DEFAULT_MIRRORS)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(name: str, directory: Path, mirror_list=None, timeout: float = 60.0) -> Path:
    """Fetch one official file into directory from the first mirror that serves it with the
    right md5; a partial or wrong download never takes the final name."""
    size, md5 = MNIST_FILES[name]
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    errors = []
    for base in mirror_list or mirrors():
        url = base.rstrip("/") + "/" + name
        tmp = tmp_name(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            got = md5sum(Path(tmp))
            if got != md5:
                errors.append(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
                continue
            os.replace(tmp, target)
            return target
        except OSError as exc:
            errors.append(f"{url}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"could not download {name}:\n  " + "\n  ".join(errors))


def load_mnist(data_dir: str | os.PathLike[str] | None = None, download: bool = False
               ) -> tuple[tuple[numpy.ndarray, numpy.ndarray], tuple[numpy.ndarray, numpy.ndarray]]:
    """((train_images, train_labels), (test_images, test_labels)) as uint8 arrays."""
    directory = cache_dir(data_dir) / "mnist"
    arrays = {}
    for name in MNIST_FILES:
        path = directory / name
        if not path.exists():
            if not download:
                raise FileNotFoundError(
                    f"MNIST file {path} is missing. Run with --download (or download=True) to fetch the "
                    f"official files into {directory}, or set GPUNET_DATA / --data-dir to where they are.")
            download_file(name, directory)
        verify_cached(path)
        arrays[name] = read_idx(path)
    return ((arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]),
            (arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]))


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _verified(directory: Path) -> dict:
    try:
        data = json.loads((directory / VERIFIED).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(directory: Path, name: str, path: Path) -> None:
    known = _verified(directory)
    known[name] = _fingerprint(path)
    try:
        atomic_write(directory / VERIFIED, json.dumps(known, indent=1).encode())
    except OSError:  # a read-only cache still works; it is verified again next time
        pass


def verify_cached(path) -> None:
    """Refuse an official MNIST file whose size or md5 is not the official one. Checked on first
    use and after any change to the file; remembered in .verified.json otherwise."""
    path = Path(path)
    if path.name not in MNIST_FILES:
        return
    size, md5 = MNIST_FILES[path.name]
    if _verified(path.parent).get(path.name) == _fingerprint(path):
        return
    actual = path.stat().st_size
    if actual != size:
        raise ValueError(f"{path}: {actual} bytes, but the official file has {size}; it is damaged or not "
                         f"the official file (delete it and run with --download to fetch it again)")
    got = md5sum(path)
    if got != md5:
        raise ValueError(f"{path}: md5 {got} does not match the official {md5}; it is damaged or not the "
                         f"official file (delete it and run with --download to fetch it again)")
    _remember(path.parent, path.name, path)
