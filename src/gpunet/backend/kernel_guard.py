"""The guard every CupyOps kernel path has, written once: the kernel runs only on what it handles
(float32, C-contiguous, not empty); anything else goes to the base Ops, written against cupy as
well. An empty input never reaches a launch: CuPy would round a grid of no blocks up to one,
running over memory the op does not own."""
from __future__ import annotations

import functools
import inspect

import numpy

from gpunet.backend.ops import Ops

_FALLBACK = object()  # kernel_or_fallback's default for an empty input: the base Ops' method
_FLOAT32 = numpy.dtype("float32")


def kernel_or_fallback(*arrays: str, nonempty: str | None = None, contiguous: tuple[str, ...] = (),
                       if_empty=_FALLBACK, fallback=None):
    """The guard of every kernel path, written once. The decorated override runs only when each
    argument named in `arrays` is a float32 C-contiguous array (or None: unused) and the one named
    `nonempty` has elements; otherwise `fallback` (by default the base Ops' method of the same name,
    what super() gives a CupyOps) runs with the same arguments. `contiguous` names arguments made
    C-contiguous first, for the kernel and the fallback alike. With `if_empty`, an empty `nonempty`
    returns that value instead of falling back. A condition of one kernel alone (an activation it
    lacks, a dtype of ids) stays in the override, explicit.

    The argument names are turned into positions once, here: the check on each call (every layer,
    every step) costs a few lookups, not a signature bind, and copies no argument list unless an
    argument must be made contiguous. functools.wraps keeps the signature the
    base's (tests/backend/test_devices.py checks that)."""
    def decorate(method):
        params = list(inspect.signature(method).parameters.values())[1:]  # after self
        position = {p.name: i for i, p in enumerate(params)}
        default = {p.name: p.default for p in params}
        unknown = [n for n in (*arrays, *contiguous, *([nonempty] if nonempty else [])) if n not in position]
        if unknown:
            raise TypeError(f"kernel_or_fallback: {method.__qualname__} has no argument {unknown[0]!r}")
        base = fallback if fallback is not None else getattr(Ops, method.__name__)
        checked = tuple((position[n], n, default[n]) for n in arrays)
        empty = (position[nonempty], nonempty, default[nonempty]) if nonempty else None
        made_contiguous = tuple((position[n], n) for n in contiguous)

        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            for i, name in made_contiguous:  # (a copy of the arguments only when one is not contiguous)
                a = args[i] if i < len(args) else kwargs.get(name)
                if a is not None and not a.flags.c_contiguous:
                    args, kwargs = _replaced(args, kwargs, i, name, self.xp.ascontiguousarray(a))
            if empty is not None and _pick(args, kwargs, empty).size == 0:
                return base(self, *args, **kwargs) if if_empty is _FALLBACK else if_empty
            for slot in checked:
                a = _pick(args, kwargs, slot)
                if a is not None and (a.dtype != _FLOAT32 or not a.flags.c_contiguous):
                    return base(self, *args, **kwargs)
            return method(self, *args, **kwargs)

        return guarded
    return decorate


def float32_contiguous(*arrays) -> bool:
    """The kernels take C-contiguous float32 arrays (None stands for an unused argument)."""
    return all(a is None or (a.dtype == "float32" and a.flags.c_contiguous) for a in arrays)


def _pick(args, kwargs, slot):
    """The argument at slot (position, name, default) of a call."""
    i, name, default = slot
    return args[i] if i < len(args) else kwargs.get(name, default)


def _replaced(args, kwargs, i, name, value):
    """args and kwargs with argument i (or keyword name) replaced by value."""
    if i < len(args):
        return (*args[:i], value, *args[i + 1:]), kwargs
    return args, {**kwargs, name: value}
