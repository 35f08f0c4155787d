"""MNIST: the four official files, downloaded only when asked, md5-checked, written atomically."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from gpunet.data.idx import read_idx

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


def cache_dir(data_dir=None) -> Path:
    """data_dir, else $GPUNET_DATA, else ~/.cache/gpunet."""
    root = data_dir or os.environ.get("GPUNET_DATA") or Path.home() / ".cache" / "gpunet"
    return Path(root)


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
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
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


def load_mnist(data_dir=None, download: bool = False):
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
        arrays[name] = read_idx(path)
    return ((arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]),
            (arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]))
