"""Checkpoints: one safetensors file with the weights, and the architecture and input
preprocessing as JSON in its metadata. Written atomically; read without unpickling anything.

Every tensor's sha256 (of its bytes as stored) is kept in the metadata under "checksums", and
read_checkpoint refuses a file whose tensor differs from its checksum, naming the tensor.
Checkpoints written before checksums existed (no "checksums" entry) still load.

Before a model is built from a file, every size its architecture names is checked against the
tensors stored for that layer (check_sizes), so an edited architecture such as Dense(1e9, 1e9) is
refused in one line instead of allocating exabytes; the preprocessing is checked as well."""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import struct
from pathlib import Path

import numpy
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as dump_tensors

from gpunet.backend import Device, to_numpy
from gpunet.files import atomic_write
from gpunet.layers.base import LAYER_TYPES, Layer, build_layer
from gpunet.preprocess import check_spec
from gpunet.validate import not_special_file

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
    if Path(path).is_dir():
        raise IsADirectoryError(f"gn.save: {path} is a folder; give a file path such as "
                                f"{Path(path) / 'model.safetensors'}")
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
    not_special_file(path)
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
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested thousands deep
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
    preprocess = meta.get("preprocess")
    check_spec(preprocess, f"{path}: preprocessing")
    try:
        check_sizes(path, meta.get("architecture"), weights)
        model = _build(path, meta.get("architecture"), weights)
    except RecursionError:  # an edited architecture of Sequentials nested thousands deep
        raise ValueError(f"{path}: checkpoint does not match its architecture: layers nested too deeply to "
                         "build") from None
    verify()  # after the architecture check, which names a wrong shape more precisely
    _check_values(path, model, weights)
    model.preprocess = preprocess
    return model.to(device) if device is not None else model


def _build(path, architecture, weights: dict) -> Layer:
    """The model of architecture with weights loaded; a mismatch is one line naming the file."""
    try:
        model = build_layer(architecture)
        model.load_state_dict(weights, strict=True)
    except (KeyError, ValueError, TypeError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str(KeyError) adds quotes
        raise ValueError(f"{path}: checkpoint does not match its architecture: {reason}") from None
    return model


def _check_values(path, model: Layer, weights: dict) -> None:
    """Refuse tensors that load_state_dict would cast without a word: integers where the layer keeps
    floats, or the reverse (a file without checksums, or with rewritten ones, can hold them). NaN
    weights load: eval reports their loss as null and generate refuses them, naming the cause."""
    own = model.state_dict()
    for name, stored in weights.items():
        kept = own[name].dtype
        if (stored.dtype.kind == "f") != (kept.kind == "f"):
            raise ValueError(f"{path}: tensor {name!r} holds {stored.dtype} values, but the layer keeps {kept}; "
                             "the file was edited or damaged")


# Sizes an architecture may name beyond what its tensors hold: a small model whose layer names
# sizes a little off allocates at most this many values before load_state_dict names the mismatch.
SLACK_VALUES = 2**20


def check_sizes(path, architecture, weights: dict) -> None:
    """Refuse an architecture that names sizes its tensors do not have, before anything is built.

    A built-in layer's parameters are shaped from the numbers in its description (a Dense's in and
    out features, a convolution's channels and kernel, an LSTM's sizes): in a file that matches its
    architecture, the largest of those numbers, and the products of the two and of the three
    largest, are at most the number of values the layer's tensors hold (a weight holds at least
    that product; stride and padding rarely exceed the kernel, and SLACK_VALUES covers them). A
    layer with no tensors in the file (a pool, or a layer whose tensors were removed) is measured
    against the whole file. Layers a user registered are built as they are: their numbers may
    mean anything. So Dense(1e9, 1e9) in an edited file is one line, not 6.94 EiB allocated."""
    everything = sum(t.size for t in weights.values())
    for name, config in _leaf_layers(architecture, ""):
        cls = LAYER_TYPES.get(config.get("type"))
        if cls is None or not cls.__module__.startswith("gpunet."):
            continue
        own = [t for key, t in weights.items() if not name or key.startswith(name + ".")]
        values = sum(t.size for t in own) if own else everything
        sizes = sorted((v for v in _numbers(config.get("args")) if not v < 1), reverse=True)  # NaN stays
        for k in range(1, 4):
            if len(sizes) < k:
                break
            product = math.prod(sizes[:k])
            if not product <= max(values, SLACK_VALUES):  # also NaN
                named = ", ".join(_size(v) for v in sizes[:k])
                raise ValueError(f"{path}: layer {name or 'the model'} ({config['type']}): its architecture names "
                                 f"the size{'s' if k > 1 else ''} {named}, more than the {values} values of "
                                 f"{'its' if own else 'all'} tensors in the file allow; the architecture does not "
                                 "match the weights (the file was edited or damaged)")


def _size(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value == int(value) else f"{value:g}"


def _leaf_layers(config, prefix: str):
    """(state_dict prefix, config) of each layer description with "args" in a Sequential tree."""
    if not isinstance(config, dict):
        return
    if isinstance(config.get("layers"), list):
        for i, child in enumerate(config["layers"]):
            yield from _leaf_layers(child, f"{prefix}{i}" if not prefix else f"{prefix}.{i}")
    elif "args" in config:
        yield prefix, config


def _numbers(value):
    """Every real number in a layer's args (inside lists too), booleans aside."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        yield float(value)
