"""The IDX file format of MNIST: read (plain or gzip) with every field checked, and write."""
from __future__ import annotations

import gzip
import os
import struct

import numpy

# IDX type code -> big-endian dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> numpy.ndarray:
    """Read an .idx or .idx.gz file into a NumPy array (native byte order).

    Raises ValueError naming the file and the problem: bad magic, unknown type code, bad
    dimensions, or a byte count that does not match the dimensions.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such IDX file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise ValueError(f"{path}: bad IDX magic 0x{raw[:4].hex()} (the first two bytes must be zero)")
    if code not in IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}; known: "
                         + ", ".join(f"0x{c:02x}" for c in IDX_TYPES))
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = numpy.dtype(IDX_TYPES[code])
    expected = int(numpy.prod(dims, dtype=numpy.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: dimensions {dims} of {dtype.name} need {expected} data bytes, "
                         f"found {len(raw) - header}")
    return numpy.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path, array: numpy.ndarray) -> None:
    """Write an array as IDX (gzip-compressed when the name ends in .gz)."""
    codes = {numpy.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
    array = numpy.asarray(array)
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"{path}: IDX cannot hold dtype {array.dtype}")
    body = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body += array.astype(IDX_TYPES[code]).tobytes()
    data = gzip.compress(body) if os.fspath(path).endswith(".gz") else body
    with open(path, "wb") as f:
        f.write(data)
