"""Where gpunet keeps what it caches: downloaded datasets ($GPUNET_DATA) and measurements such as
the GEMM choices ($GPUNET_CACHE), each by default in $XDG_CACHE_HOME/gpunet, else ~/.cache/gpunet."""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$XDG_CACHE_HOME/gpunet (an absolute XDG_CACHE_HOME only, as the XDG spec says), else ~/.cache/gpunet."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "gpunet"


def data_dir() -> Path:
    """$GPUNET_DATA, else cache_home(): where datasets are downloaded to."""
    return Path(os.environ.get("GPUNET_DATA") or cache_home())


def cache_dir() -> Path:
    """$GPUNET_CACHE, else cache_home(): where measurements are remembered."""
    return Path(os.environ.get("GPUNET_CACHE") or cache_home())
