"""Writing files safely: atomically (temporary file, fsync, rename), with the usual permissions
(0666 less the umask), and naming the file in every error. Interrupted writes leave hidden
`.NAME.XXXXXXXX.tmp` files beside their target; clean_stale_tmp removes those of a dead run."""
from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path

_TMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")


def tmp_name(path: Path) -> Path:
    """A fresh hidden temporary name beside path: .NAME.XXXXXXXX.tmp"""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def atomic_write(path, data: bytes) -> None:
    """Write data to path atomically: a temporary file beside it (created 0666 less the umask),
    fsync, rename over path, fsync the folder. On any failure path keeps its old content, the
    temporary is removed, and the OSError names path."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the temporary was written, naming the temporary
        raise IsADirectoryError(f"{path} is a folder, not a file; give the path of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _named(exc, path.parent) from None
    tmp = tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            raise _named(exc, path) from None
        raise
    _fsync_folder(path.parent)


def _named(exc: OSError, path) -> OSError:
    """The same kind of OSError, with path as its filename (so messages say which file)."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path))


def _fsync_folder(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(dir_fd)


def stale_tmp_files(folder, names=None) -> list[Path]:
    """Hidden temporaries of atomic_write in folder (only those of `names` when given)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _TMP.match(entry.name)
        if match and (names is None or match.group("name") in names) and entry.is_file() and not entry.is_symlink():
            found.append(entry)
    return sorted(found)


def clean_stale_tmp(folder, names=None) -> list[Path]:
    """Remove the temporaries an interrupted run left in folder; returns what was removed.
    Call it only while holding the folder's run lock, so no live writer owns them."""
    removed = []
    for path in stale_tmp_files(folder, names):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
