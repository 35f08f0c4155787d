"""Checkpoints: one safetensors file with the weights, and the architecture and input
preprocessing as JSON in its metadata. Written atomically; read without unpickling anything.

Every tensor's sha256 (of its bytes as stored) is kept in the metadata under "checksums", and
read_checkpoint refuses a file whose tensor differs from its checksum, naming the tensor.
Checkpoints written before checksums existed (no "checksums" entry) still load."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as dump_tensors

from gpunet.backend import Device, to_numpy
from gpunet.files import atomic_write
from gpunet.layers.base import Layer, build_layer

__all__ = ["load", "read_checkpoint", "save"]

FORMAT = "gpunet"
FORMAT_VERSION = "1"
EXTRA_PREFIX = "__extra__/"  # tensors that are not model weights (optimizer state)
CHECKSUM = "sha256"


def _digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored_bytes(a: numpy.ndarray) -> memoryview:
    """The bytes safetensors writes for a: C order, little-endian."""
    a = numpy.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not numpy.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a).cast("B")  # type: ignore[arg-type]  # numpy declares __buffer__ for Python 3.12+ only


def save(model: Layer, path: str | os.PathLike[str], extra_tensors: dict | None = None,
         extra_metadata: dict | None = None) -> Path:
    """Save model (weights, architecture, preprocessing) to one .safetensors file, atomically."""
    tensors = {name: numpy.array(to_numpy(a), order="C") for name, a in model.state_dict().items()}
    for name, a in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + name] = numpy.array(to_numpy(a), order="C")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "architecture": json.dumps(model.to_config()),
                "preprocess": json.dumps(getattr(model, "preprocess", None))}
    for key, value in (extra_metadata or {}).items():
        metadata[key] = json.dumps(value)
    metadata["checksums"] = json.dumps({"algorithm": CHECKSUM,
                                        "tensors": {k: _digest(_stored_bytes(v)) for k, v in tensors.items()}})
    atomic_write(path, dump_tensors(tensors, metadata=metadata))
    return Path(path)


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """(model tensors, extra tensors, metadata with JSON values decoded); clear errors for
    pickles, corrupt or truncated files, damaged tensors and files that are not gpunet checkpoints."""
    weights, extra, decoded, verify = _read(path)
    verify()
    return weights, extra, decoded


def _read(path):
    """read_checkpoint, with the checksum check returned as a function to call."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file (give {path / 'model.safetensors'})")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint file") from None
    if (raw[:1] == b"\x80" or raw[:2] == b"PK") and not _looks_like_safetensors(raw):
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
    checksums = decoded.pop("checksums", None)

    def verify():
        if checksums is not None:
            _verify(path, raw, 8 + header_len, header, checksums)

    weights = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    extra = {k[len(EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    return weights, extra, decoded, verify


def _looks_like_safetensors(raw: bytes) -> bool:
    """An 8-byte little-endian header length that fits the file, then a JSON object. (A header
    length whose low byte is 0x80 must not be taken for a pickle's opcode.)"""
    if len(raw) < 10:
        return False
    (header_len,) = struct.unpack("<Q", raw[:8])
    return 8 + header_len <= len(raw) and raw[8:9] == b"{"


def _verify(path, raw: bytes, data_start: int, header: dict, checksums) -> None:
    """Refuse a file whose tensors differ from the checksums saved with them."""
    if not isinstance(checksums, dict) or checksums.get("algorithm") != CHECKSUM \
            or not isinstance(checksums.get("tensors"), dict):
        raise ValueError(f"{path}: corrupt checkpoint metadata (unreadable checksums)")
    recorded = checksums["tensors"]
    names = [k for k in header if k != "__metadata__"]
    missing = sorted(set(recorded) - set(names))
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]!r} is listed in the checksums but missing from the file")
    for name in names:
        begin, end = header[name]["data_offsets"]
        if name not in recorded:
            raise ValueError(f"{path}: tensor {name!r} has no checksum (added to the file after it was saved?)")
        got = _digest(memoryview(raw)[data_start + begin : data_start + end])
        if got != recorded[name]:
            raise ValueError(f"{path}: tensor {name!r} does not match its checksum ({CHECKSUM} {got[:16]}, saved "
                             f"{str(recorded[name])[:16]}): the file is damaged; use another copy or retrain")


def load(path: str | os.PathLike[str], device: str | Device | None = None) -> Layer:
    """Rebuild the model saved at path (on the CPU, or on `device`)."""
    weights, _, meta, verify = _read(path)
    try:
        model = build_layer(meta["architecture"])
        model.load_state_dict(weights, strict=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: checkpoint does not match its architecture: {exc}") from None
    verify()  # after the architecture check, which names a wrong shape more precisely
    model.preprocess = meta.get("preprocess")
    return model.to(device) if device is not None else model
