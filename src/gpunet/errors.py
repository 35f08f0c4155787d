"""User errors on the command line: one line on stderr naming what and where, no traceback.

Exit status 2 when the command line itself is wrong (a flag's value, flags that do not go
together), 1 for everything else (files, data, environment variables, a diverged run), 128 + the
signal after an interrupt: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP. `--debug` or
GPUNET_DEBUG=1 prints the traceback before the line.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback

USAGE = 2
FAILURE = 1
INTERRUPTED = 130


class UsageError(ValueError):
    """The command line is wrong: exit status 2."""


class DeviceOutOfMemory(MemoryError):
    """The CPU or the GPU ran out of memory in a batch of training, evaluation or prediction; the
    message names the batch and suggests a smaller one (see out_of_memory)."""


class Exit(SystemExit):
    """Ends the command with `code` after its one-line message went to stderr; str() is the
    message, so callers (and tests) can read what was said."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(text: str) -> str:
    """Several lines joined by '; ', surrounding space removed."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


_OS_MESSAGES = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.EEXIST: "already exists",
}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether exc is the backend running out of memory: NumPy raises MemoryError (its
    _ArrayMemoryError), CuPy cupy.cuda.memory.OutOfMemoryError (a MemoryError too); the name is
    matched as well, for a CuPy build whose class does not derive from MemoryError."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


@contextlib.contextmanager
def out_of_memory(device: str, doing: str, batch: int, option: str):
    """Turn the backend's out-of-memory error inside the block into DeviceOutOfMemory, one line naming
    the device, what it was doing, the batch and a smaller batch size to try (half of it), through
    `option` (how the caller sets the batch size). The one place out-of-memory is recognised."""
    try:
        yield
    except DeviceOutOfMemory:
        raise
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        detail = one_line(str(exc)) or type(exc).__name__
        advice = (f"try a smaller batch size, e.g. {batch // 2} ({option})" if batch > 1 else
                  "one sample does not fit: free memory, or use a smaller model")
        raise DeviceOutOfMemory(f"the {device.upper()} ran out of memory {doing} with a batch of {batch} ({detail}); "
                                f"{advice}") from exc


def describe(exc: BaseException) -> str:
    """What went wrong, in one line, for a user."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        what = _OS_MESSAGES.get(exc.errno) or (exc.strerror or str(exc)).lower()
        return one_line(f"{os.fsdecode(exc.filename)}: {what}")
    if is_out_of_memory(exc) and not isinstance(exc, DeviceOutOfMemory):  # outside a batch (which names itself)
        return one_line(f"out of memory ({exc})") if str(exc) else "out of memory"
    if isinstance(exc, UnicodeError):
        return one_line(f"text that is not valid UTF-8 or cannot be shown ({exc})")
    if isinstance(exc, (OSError, ValueError, TypeError, RuntimeError, MemoryError)) and str(exc):
        return one_line(str(exc))  # gpunet's own messages name what and where
    return one_line(f"internal error: {type(exc).__name__}: {exc} "
                    "(run again with --debug for the traceback, and please report it)")


def fail(command: str, message: str, code: int = FAILURE) -> Exit:
    """Print `gpunet COMMAND: message` on stderr and return the Exit to raise."""
    prefix = f"gpunet {command}: " if command else "gpunet: "
    message = one_line(message)
    line = message if message.startswith("gpunet") else prefix + message
    print(line, file=sys.stderr, flush=True)
    return Exit(code, line)


@contextlib.contextmanager
def handled(command: str, debug: bool = False):
    """Turn every exception of a command into one line on stderr and an exit status."""
    try:
        yield
    except Exit:
        raise
    except SystemExit as exc:
        if isinstance(exc.code, str):  # raise SystemExit("gpunet cmd: what went wrong")
            raise fail(command, exc.code) from None
        raise
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        signum = getattr(exc, "signum", None)  # gpunet.training.resume.Interrupted: SIGTERM or SIGHUP, not only Ctrl-C
        code = 128 + signum if isinstance(signum, int) else INTERRUPTED
        raise fail(command, str(exc) or "interrupted", code) from None
    except Exception as exc:  # noqa: BLE001 - every error ends in one line
        if debug:
            traceback.print_exc()
        code = USAGE if isinstance(exc, UsageError) else FAILURE
        raise fail(command, describe(exc), code) from None
