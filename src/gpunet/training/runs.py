"""Run folders: a new folder per run, `runs/latest` pointing to the newest, a lock per folder,
and the refusal to write over a run that is already there.

A run folder holds the files of one training run (RUN_FILES). `gpunet train` without --out
makes `runs/YYYYmmdd-HHMMSS-MODEL` and points the symlink `runs/latest` at it; an explicit --out
that already holds a run is refused unless --resume, or --overwrite, which moves the old run
into a sub-folder `replaced-YYYYmmdd-HHMMSS` (nothing is ever deleted); gn.fit(out_dir=...) makes
the same check (check_existing, with its resume= and overwrite=), once per run (gpunet.training.setup). While a run trains, the
folder's `.lock` is held (an OS lock, released even by kill -9), so a second run into the same
folder fails at once; the temporaries a dead run left are removed when the next one starts. A
folder where the lock cannot be made (a read-only mount, no permission) is refused in one line
before any work, as is a new run folder in a `runs/` that cannot be written.
"""
from __future__ import annotations

import datetime
import errno
import os
import socket
from pathlib import Path

from gpunet.errors import describe
from gpunet.files import clean_stale_tmp

RUN_FILES = ("model.safetensors", "last.safetensors", "history.json", "metrics.csv", "history.png")
LOCK_NAME = ".lock"
RUNS_ROOT = Path("runs")
LATEST = "latest"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunExists(FileExistsError):
    """The output folder already holds a run."""


class RunLocked(RuntimeError):
    """Another live process trains into the folder."""


def holds_run(folder) -> list[str]:
    """The run files already in folder (empty when there is none)."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()] if folder.is_dir() else []


def _stamp(now=None) -> str:
    return (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------- the lock
class RunLock:
    """An exclusive lock on a run folder: `.lock` inside it, locked with flock, so it dies with
    its process. Taken once per run (gpunet.training.setup decides who opens the folder): a second
    RunLock on the same folder, even in the same process, is refused as another run."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    break  # a file system without locks (ENOLCK): go on unlocked rather than refuse
                owner = _read_owner(fd)
                os.close(fd)
                raise RunLocked(f"{self.folder} is in use by another training run{owner}; wait for it to end "
                                f"or choose another --out") from None
            try:  # the file we locked must still be the one at the path (the last owner may have removed it)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_stamp()}\n".encode())
        self.fd = fd
        return self

    def remove_stale_tmp(self) -> list[Path]:
        """Remove the temporaries of run files a dead run left in the folder; returns them. Only
        while the lock is held is it sure that no live writer owns them."""
        return clean_stale_tmp(self.folder, RUN_FILES)

    def release(self) -> None:
        if self.fd is None:  # not held (released already)
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_owner(fd) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


# ---------------------------------------------------------------- folders
def new_run_folder(model: str, root=RUNS_ROOT, now=None) -> Path:
    """A new, empty folder root/STAMP-MODEL (-2, -3, ... when that name is taken)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{_stamp(now)}-{model}"
    for n in range(1, 10000):
        folder = root / (base if n == 1 else f"{base}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RunExists(f"{root}: could not find a free name for a new run folder near {base}")


def point_latest(folder, root=RUNS_ROOT) -> str | None:
    """Make root/latest a symlink to folder (atomically). A real folder or file named latest
    (left by older gpunet versions) is moved aside first, never deleted; returns a note then."""
    root, folder = Path(root), Path(folder)
    latest = root / LATEST
    note = None
    if latest.exists() and not latest.is_symlink():
        aside = _free_name(root, f"latest-before-{_stamp()}")
        os.rename(latest, aside)
        note = f"moved the earlier {latest} (a folder, not a link) to {aside}"
    tmp = root / f".{LATEST}.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(folder.name if folder.parent.resolve() == root.resolve() else os.path.abspath(folder), tmp)
        os.replace(tmp, latest)
    except OSError as exc:  # no symlinks here: say where the run is instead
        if tmp.is_symlink():
            tmp.unlink()
        return (note + "; " if note else "") + f"could not point {latest} at {folder} ({exc.strerror or exc})"
    return note


def _free_name(parent: Path, base: str) -> Path:
    candidate, n = parent / base, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = parent / f"{base}-{n}"
    return candidate


def move_aside(folder) -> Path:
    """Move the run files in folder into folder/replaced-STAMP and return that sub-folder."""
    folder = Path(folder)
    aside = _free_name(folder, f"replaced-{_stamp()}")
    aside.mkdir()
    for name in RUN_FILES:
        if (folder / name).exists():
            os.rename(folder / name, aside / name)
    return aside


def check_out_folder(folder, option: str = "--out") -> None:
    """Refuse an --out (or out_dir: option) that cannot be a run folder, before any work."""
    if str(folder).strip() == "":  # before Path(), which reads "" as "."
        raise ValueError(f"{option} is empty; give a folder")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{option} {folder} is a file, not a folder")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{option} {folder}: {parent} is a file, not a folder")
            break


# how a refusal names each setting of a run: on the command line ("cli"), and as arguments of gn.fit ("fit")
OPTION_NAMES = {
    "where": ("", "fit: "),  # (the command line's errors are prefixed by the command already)
    "resume": ("--resume", "resume=True"),
    "a_resume": ("--resume", "a resume"),
    "overwrite": ("--overwrite", "overwrite=True"),
    "allow_data_change": ("--allow-data-change", "allow_data_change=True"),
    "out": ("--out", "out_dir"),
    "folder": ("the output folder", "out_dir"),
}


def option_names(by: str) -> dict:
    """OPTION_NAMES as the command line (by="cli") or gn.fit (by="fit") spells them."""
    column = ("cli", "fit").index(by)
    return {key: names[column] for key, names in OPTION_NAMES.items()}


def check_existing(out, resume: bool = False, overwrite: bool = False, say=print, options=None) -> None:
    """The one refusal to lose a run, for `gpunet train` and gn.fit alike: resume needs
    out/last.safetensors; without it, a folder that holds a run (holds_run) is refused, or with
    overwrite its run files are moved into out/replaced-STAMP (said). Call it with out's lock held.
    options: option_names(...), gn.fit's by default."""
    options = options or option_names("fit")
    out = Path(out)
    existing = holds_run(out)
    if resume:
        if not (out / "last.safetensors").exists():
            raise FileNotFoundError(f"{options['resume']}: {out / 'last.safetensors'} does not exist, so there is "
                                    "nothing to resume" + (f" (the folder holds {', '.join(existing)})"
                                                           if existing else ""))
    elif existing:
        if not overwrite:
            raise RunExists(f"{out} already holds a run ({', '.join(existing)}); continue it with "
                            f"{options['resume']}, move it aside with {options['overwrite']}, or choose another "
                            f"{options['out']}")
        aside = move_aside(out)
        say(f"moved the earlier run in {out} to {aside}")


def _missing_folders(folder: Path) -> list[Path]:
    """folder and those of its parents that do not exist yet, deepest first: what mkdir(parents=True) makes."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing


def _remove_empty(folders) -> None:
    """rmdir each of folders (deepest first) while they are empty: a run that wrote anything keeps its folder."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class RunFolder:
    """The locked folder of one run. A folder made for this run (no --out) becomes runs/latest once
    training starts; if the command fails before that, the still-empty folder is removed again, as
    are the folders this run created for an --out (or out_dir) while they are empty: failed starts
    leave nothing behind."""

    def __init__(self, path: Path, lock: RunLock, fresh: bool, created=()):
        self.path, self.lock, self.fresh, self.started = path, lock, fresh, False
        self.created = list(created)  # deepest first

    def start(self, say=print) -> None:
        self.started = True
        if self.fresh:
            note = point_latest(self.path)
            if note:
                say(f"note: {note}")

    def close(self) -> None:
        self.lock.release()
        if self.fresh and not self.started:
            try:
                self.path.rmdir()  # only succeeds while empty
            except OSError:
                pass
        _remove_empty(self.created)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_run(out, resume: bool = False, overwrite: bool = False, say=print, options=None,
             fresh: bool = False) -> RunFolder:
    """out, created when missing, locked, cleared of a dead run's temporaries, and checked by
    check_existing; on a refusal the lock is released and what this call created is removed.
    options: option_names(...), gn.fit's by default."""
    options = options or option_names("fit")
    check_out_folder(out, options["out"])
    out = Path(out)
    created = [] if fresh else _missing_folders(out)
    try:
        folder = RunFolder(out, RunLock(out).acquire(), fresh, created)
    except OSError as exc:  # a read-only folder, or a .lock that is not a file: said before any work
        _remove_empty(created)
        raise _cannot_lock(out, exc, options) from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        removed = folder.lock.remove_stale_tmp()
        if removed:
            say(f"removed {len(removed)} temporary file(s) an interrupted run left in {out}")
        check_existing(out, resume, overwrite, say, options)
    except BaseException:
        folder.close()
        raise
    return folder


# the errors that mean "this process may not write here"
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _why(exc: OSError) -> str:
    return (exc.strerror or "not writable").lower()  # "read-only file system", "permission denied"


def _cannot_lock(folder: Path, exc: OSError, options) -> OSError:
    """The one line for a run folder whose lock cannot be made (options: how to name --out, --resume)."""
    where = f"{options['out']} {folder}"
    if exc.errno in _READ_ONLY:
        return PermissionError(f"{where}: cannot write there ({_why(exc)}); a run writes its lock and "
                               f"checkpoints in its folder: choose a writable {options['out']} (to continue a run "
                               f"kept there, copy its folder and {options['resume']} the copy)")
    return OSError(f"{where}: cannot make the run's lock ({describe(exc)})")


def prepare(out, model: str, resume: bool = False, overwrite: bool = False, say=print) -> RunFolder:
    """The folder a `gpunet train` writes to, created and locked, with the checks of the module
    docstring done before any data is loaded."""
    fresh = False
    if out is None:
        latest = RUNS_ROOT / LATEST
        if resume:
            if not latest.exists():
                raise FileNotFoundError(f"--resume without --out continues {latest}, and there is no such run "
                                        "(give --out DIR)")
            out = latest.resolve()
        else:
            try:
                out, fresh = new_run_folder(model), True
            except OSError as exc:
                if exc.errno not in _READ_ONLY:
                    raise
                raise PermissionError(f"cannot make a run folder in {RUNS_ROOT}{os.sep} ({_why(exc)}): "
                                      "run gpunet train from a writable folder, or give --out DIR") from None
    return open_run(out, resume, overwrite, say, option_names("cli"), fresh)
