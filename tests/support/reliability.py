"""Helpers of the reliability tests (issue 13): run the CLI in-process, read its one error line,
and snapshot a folder to prove that nothing that existed before was changed."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from gpunet.cli import main


def cli(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `gpunet ARGV` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """stderr's only line (a GPU fallback note aside); fails on a traceback or more lines."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("gpunet: no usable GPU")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


def snapshot(folder) -> dict:
    """relative path -> (bytes, mtime_ns, mode) of every file under folder."""
    folder = Path(folder)
    result = {}
    if not folder.exists():
        return result
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            result[os.fspath(path.relative_to(folder))] = (path.read_bytes(), st.st_mtime_ns, st.st_mode)
    return result


class FullDisk:
    """What os.fdopen returns on a full disk: a file on fd whose writes fail with ENOSPC."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
