"""The IDX file format of MNIST: read (plain or gzip) with every field checked, and write."""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy

# IDX type code -> big-endian dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_DEFLATE_RATIO = 1032  # deflate cannot inflate one byte to more than this
CHUNK = 1 << 20
MAX_EXTRA_COUNTED = 1 << 26  # trailing data is counted for the message up to 64 MiB, then refused


def read_idx(path: str | os.PathLike[str]) -> numpy.ndarray:
    """Read an .idx or .idx.gz file into a NumPy array (native byte order).

    Streams: the header is read and checked first, then exactly the bytes it declares, so memory
    stays bounded by the declared size (a gzip bomb is refused once it inflates past it). Raises
    ValueError naming the file and the problem: bad magic, unknown type code, bad dimensions, or
    a byte count that does not match the dimensions.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such IDX file") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path} is a folder, not an IDX file") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        compressed = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f, mode="rb") if compressed else f
        try:
            return _read_stream(path, stream, size, compressed)
        except (OSError, EOFError, zlib.error) as exc:
            if not compressed or getattr(exc, "filename", None):
                raise
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None


def _read_exactly(stream, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_stream(path, stream, file_size: int, compressed: bool) -> numpy.ndarray:
    head = _read_exactly(stream, 4)
    if len(head) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(head)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", head)
    if zero != 0:
        raise ValueError(f"{path}: bad IDX magic 0x{head.hex()} (the first two bytes must be zero)")
    if code not in IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}; known: "
                         + ", ".join(f"0x{c:02x}" for c in IDX_TYPES))
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    raw_dims = _read_exactly(stream, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, "
                         f"file has {4 + len(raw_dims)}")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    dtype = numpy.dtype(IDX_TYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    # what the file can hold at most: its own size, or for gzip deflate's largest ratio (1032:1)
    capacity = file_size * MAX_DEFLATE_RATIO if compressed else file_size - header
    if expected > capacity:
        raise ValueError(f"{path}: dimensions {dims} of {dtype.name} need {expected} data bytes, "
                         + (f"more than this {file_size}-byte gzip file can hold" if compressed
                            else f"found {max(capacity, 0)}"))
    data = numpy.empty(expected, dtype=numpy.uint8)  # pages are only touched as data arrives
    view, got = memoryview(data), 0  # type: ignore[arg-type]  # numpy declares __buffer__ for Python 3.12+ only
    while got < expected:
        n = stream.readinto(view[got : got + CHUNK])
        if not n:
            break
        got += n
    if got < expected:
        raise ValueError(f"{path}: dimensions {dims} of {dtype.name} need {expected} data bytes, found {got}")
    extra = len(stream.read(1 << 16))
    if extra:
        rest = extra + _count_rest(stream)
        raise ValueError(f"{path}: dimensions {dims} of {dtype.name} need {expected} data bytes, "
                         f"found {expected + rest}" + (" or more" if rest >= MAX_EXTRA_COUNTED else ""))
    return data.view(dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _count_rest(stream) -> int:
    """Bytes left in stream, counted (not kept) up to MAX_EXTRA_COUNTED."""
    total = 0
    while total < MAX_EXTRA_COUNTED:
        chunk = stream.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    return total


def write_idx(path: str | os.PathLike[str], array: numpy.ndarray) -> None:
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
