"""Checks at the edge, before any work: argument ranges and finiteness, environment variables,
and data (non-finite values, pixel ranges, empty sets), each failing with a message that names
the argument or file and where in it the problem is."""
from __future__ import annotations

import argparse
import math
import numbers
import os
import stat

import numpy

MAX_SEED = 2**63 - 1


# ---------------------------------------------------------------- plain values (library arguments)
def positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def non_negative_int(name: str, value, maximum: int | None = None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return int(value)


def finite(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """value as a float, refused when not a finite real number within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'greater than' if low_open else 'at least'} {low:g}, got {value:g}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'less than' if high_open else 'at most'} {high:g}, got {value:g}")
    return value


def seed(name: str, value) -> int:
    return non_negative_int(name, value, MAX_SEED)


# ---------------------------------------------------------------- command-line types (exit 2)
def _argtype(check, label, kind=int):
    def parse(text: str):
        try:
            number = float(text) if kind is float else int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {label}, got {text!r}") from None
        try:
            return check(number)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"must be {label}, got {text!r}") from exc
    parse.__name__ = label
    return parse


cli_positive_int = _argtype(lambda v: positive_int("value", v), "a positive integer")
cli_non_negative_int = _argtype(lambda v: non_negative_int("value", v), "a non-negative integer")
cli_seed = _argtype(lambda v: seed("value", v), f"an integer from 0 to {MAX_SEED}")
cli_positive = _argtype(lambda v: finite("value", v, low=0, low_open=True), "positive and finite", float)
cli_non_negative = _argtype(lambda v: finite("value", v, low=0), "non-negative and finite", float)
cli_fraction = _argtype(lambda v: finite("value", v, 0, 1, True, True), "a number strictly between 0 and 1", float)
cli_dropout = _argtype(lambda v: finite("value", v, 0, 1, high_open=True), "a dropout rate in [0, 1)", float)


def cli_int_up_to(maximum: int):
    """The command-line type of a whole number from 0 to maximum (a documented cap)."""
    return _argtype(lambda v: non_negative_int("value", v, maximum), f"a non-negative integer up to {maximum:_}")


# ---------------------------------------------------------------- environment variables
ENVIRONMENT = {  # name -> the values it may take, its default (when unset or blank) first
    "GPUNET_DEVICE": ("auto", "cpu", "gpu"),
    "GPUNET_TF32": ("0", "1"),
    "GPUNET_GEMM": ("auto", "fused", "cublas", "cublaslt", "gemmex", "wmma"),
    "GPUNET_DEBUG": ("0", "1"),
}


def env_choice(name: str, env=None) -> str:
    """The value of the gpunet environment variable `name` as every reader takes it: surrounding
    space removed and lower case, its default when unset or blank; a value outside ENVIRONMENT[name]
    raises the one-line ValueError. The only place these variables are read."""
    allowed = ENVIRONMENT[name]
    value = (os.environ if env is None else env).get(name)
    choice = (value or "").strip().lower() or allowed[0]
    if choice not in allowed:
        raise ValueError(f"environment variable {name}={value!r} is not one of {', '.join(allowed)} "
                         f"(unset it or set one of those)")
    return choice


def numba_threads(env=None) -> None:
    """Refuse a NUMBA_NUM_THREADS that Numba would fail on at import ("Number of threads specified must
    be > 0", naming no variable) or print a multi-line warning with a traceback for (not a number)."""
    value = (os.environ if env is None else env).get("NUMBA_NUM_THREADS")
    if value is None:
        return
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"environment variable NUMBA_NUM_THREADS={value!r} must be a whole number of at least 1 "
                         "(Numba's worker threads; unset it for one per CPU core)")


def environment(env=None) -> None:
    """Refuse a gpunet environment variable with a value gpunet does not understand."""
    env = os.environ if env is None else env
    for name in ENVIRONMENT:
        env_choice(name, env)
    numba_threads(env)
    data = env.get("GPUNET_DATA")
    if data is not None:
        if not data.strip():
            raise ValueError("environment variable GPUNET_DATA is set but empty (unset it or name a folder)")
        if os.path.exists(data) and not os.path.isdir(data):
            raise ValueError(f"environment variable GPUNET_DATA={data!r} names a file, not a folder")
    mirrors = env.get("GPUNET_MNIST_MIRRORS")
    if mirrors is not None and mirrors.strip():
        for url in (m.strip() for m in mirrors.split(",") if m.strip()):
            if not url.startswith(("http://", "https://", "file:")):
                raise ValueError(f"environment variable GPUNET_MNIST_MIRRORS: {url!r} is not an http(s) URL")


# ---------------------------------------------------------------- files to read
# what stat says a path is, for the files gpunet never reads: reading a device such as /dev/zero
# never ends (or fills the memory), and opening a FIFO blocks until some other process writes to it
_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def not_special_file(path, what: str = "") -> None:
    """Refuse, by stat and before anything opens it, a path (after symlinks) that is a device, a FIFO
    or a socket, naming `what` (an option such as "--data") and the path. A missing path or a folder
    is left to the caller, whose message says what it expected there."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own open says so, naming the file
    for test, kind in _SPECIAL:
        if test(mode):
            label = f"{what} {os.fspath(path)}" if what else os.fspath(path)
            raise ValueError(f"{label} is {kind}, not a regular file; gpunet reads only regular files")


# ---------------------------------------------------------------- data
def first_bad_index(mask) -> tuple:
    return tuple(int(i) for i in numpy.argwhere(mask)[0])


def finite_array(a, where: str, what: str = "input") -> None:
    """Refuse NaN or Inf in a float array, naming the first position."""
    a = numpy.asarray(a)
    if a.dtype.kind in "fc" and a.size and not numpy.isfinite(a).all():
        raise ValueError(f"{where}: {what} contains NaN or Inf (first at index {first_bad_index(~numpy.isfinite(a))})")


def not_empty(n: int, where: str, what: str = "samples") -> None:
    if n == 0:
        raise ValueError(f"{where}: holds no {what}")


def images(x, spec, where: str) -> None:
    """Raw images for a model whose preprocessing divides by 255: integer or float pixel values in
    0..255. Float images in [0, 1] are refused with a hint rather than scored as almost black."""
    if not spec or spec.get("kind") != "image":
        return
    x = numpy.asarray(x)
    if x.dtype.kind not in "uif":
        raise ValueError(f"{where}: images must hold numbers (pixel values 0..255), got dtype {x.dtype}")
    if not x.size:
        return
    shape = tuple(spec.get("shape") or ())
    if shape and (x.ndim < 2 or math.prod(x.shape[1:]) != math.prod(shape)):
        raise ValueError(f"{where}: images of shape {tuple(x.shape[1:])} do not fit the model's input {shape}")
    finite_array(x, where, "images")
    low, high = x.min(), x.max()
    scale = spec.get("scale", 1 / 255)
    top = 1.0 / scale if scale else 255.0
    if low < 0 or high > top + 1e-6:
        bad = first_bad_index((x < 0) | (x > top + 1e-6))
        raise ValueError(f"{where}: pixel values must be in 0..{top:g} (raw images as stored), found {x[bad]} "
                         f"at index {bad} (values from {low} to {high})")
    if x.dtype.kind == "f" and 0 < high <= 1.0 and top > 1.0:
        raise ValueError(f"{where}: float images in [0, 1], but this model takes raw pixel values 0..{top:g} as "
                         f"stored (its preprocessing divides by {top:g}); multiply them by {top:g} or pass the "
                         f"original uint8 images")


def class_labels(y, classes: int, where: str) -> None:
    """Integer labels in [0, classes)."""
    y = numpy.asarray(y)
    if y.dtype.kind == "f":
        finite_array(y, where, "labels")
        if (y != numpy.round(y)).any():
            raise ValueError(f"{where}: labels must be whole class numbers, found {y[first_bad_index(y != numpy.round(y))]}")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integer class numbers, got dtype {y.dtype}")
    if y.size:
        bad = (y < 0) | (y >= classes)
        if bad.any():
            i = first_bad_index(bad)
            raise ValueError(f"{where}: label {y[i]} at index {i} is outside the model's {classes} classes "
                             f"(0..{classes - 1})")


def one_input_and_output(model, command: str, path) -> None:
    """The command line's eval and predict take models of one input and one output (image classifiers)."""
    several = [what for what in ("inputs", "outputs") if getattr(model, f"several_{what}", False)]
    if several:
        raise SystemExit(f"gpunet {command}: {path} is a graph model with several {' and '.join(several)}; the command "
                         f"line takes one image input and one output: use gn.load(...) and "
                         f"{'gn.evaluate' if command == 'eval' else 'model.predict'} in Python, with a list per input")
