"""Checkpoints: one safetensors file with the weights, and the architecture and input
preprocessing as JSON in its metadata. Written atomically; read without unpickling anything."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as dump_tensors

from gpunet.backend import to_numpy
from gpunet.layers.base import build_layer

FORMAT = "gpunet"
FORMAT_VERSION = "1"
EXTRA_PREFIX = "__extra__/"  # tensors that are not model weights (optimizer state)


def atomic_write(path, data: bytes) -> None:
    """Write to a temporary file beside path, fsync, then rename over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(model, path, extra_tensors: dict | None = None, extra_metadata: dict | None = None) -> Path:
    """Save model (weights, architecture, preprocessing) to one .safetensors file, atomically."""
    tensors = {name: numpy.array(to_numpy(a), order="C") for name, a in model.state_dict().items()}
    for name, a in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + name] = numpy.array(to_numpy(a), order="C")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "architecture": json.dumps(model.to_config()),
                "preprocess": json.dumps(getattr(model, "preprocess", None))}
    for key, value in (extra_metadata or {}).items():
        metadata[key] = json.dumps(value)
    atomic_write(path, dump_tensors(tensors, metadata=metadata))
    return Path(path)


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(model tensors, extra tensors, metadata with JSON values decoded); clear errors for
    pickles, corrupt or truncated files and files that are not gpunet checkpoints."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    if raw[:1] == b"\x80" or raw[:2] == b"PK":
        raise ValueError(f"{path}: this is a pickle or a torch.save zip, not a safetensors file; "
                         "gpunet never unpickles checkpoints")
    try:
        tensors = load_tensors(raw)
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, struct.error, ValueError) as exc:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gpunet checkpoint (metadata format={meta.get('format')!r})")
    try:
        decoded = {k: (json.loads(v) if k not in ("format", "format_version") else v) for k, v in meta.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({exc})") from None
    weights = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    return weights, extra, decoded


def load(path, device=None):
    """Rebuild the model saved at path (on the CPU, or on `device`)."""
    weights, _, meta = read_checkpoint(path)
    try:
        model = build_layer(meta["architecture"])
        model.load_state_dict(weights, strict=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: checkpoint does not match its architecture: {exc}") from None
    model.preprocess = meta.get("preprocess")
    return model.to(device) if device is not None else model
