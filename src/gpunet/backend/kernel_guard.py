"""The guard every CupyOps kernel path has, written once: the kernel runs only on what it handles
(float32, C-contiguous, not empty); anything else goes to the base Ops, written against cupy as
well. An empty input never reaches a launch: CuPy would round a grid of no blocks up to one,
running over memory the op does not own."""
from __future__ import annotations

import functools
import inspect

from gpunet.backend.ops import Ops

_FALLBACK = object()  # kernel_or_fallback's default for an empty input: the base Ops' method


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
    every step) costs a few lookups, not a signature bind. functools.wraps keeps the signature the
    base's (tests/backend/test_devices.py checks that)."""
    def decorate(method):
        params = list(inspect.signature(method).parameters.values())[1:]  # after self
        position = {p.name: i for i, p in enumerate(params)}
        default = {p.name: p.default for p in params}
        unknown = [n for n in (*arrays, *contiguous, *([nonempty] if nonempty else [])) if n not in position]
        if unknown:
            raise TypeError(f"kernel_or_fallback: {method.__qualname__} has no argument {unknown[0]!r}")
        base = fallback if fallback is not None else getattr(Ops, method.__name__)

        def value(args, kwargs, name):
            i = position[name]
            return args[i] if i < len(args) else kwargs.get(name, default[name])

        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            if contiguous:
                args, kwargs = list(args), dict(kwargs)
                for name in contiguous:
                    if position[name] < len(args):
                        args[position[name]] = self.xp.ascontiguousarray(args[position[name]])
                    elif name in kwargs:
                        kwargs[name] = self.xp.ascontiguousarray(kwargs[name])
            if nonempty is not None and value(args, kwargs, nonempty).size == 0:
                return base(self, *args, **kwargs) if if_empty is _FALLBACK else if_empty
            if float32_contiguous(*(value(args, kwargs, name) for name in arrays)):
                return method(self, *args, **kwargs)
            return base(self, *args, **kwargs)

        return guarded
    return decorate


def float32_contiguous(*arrays) -> bool:
    """The kernels take C-contiguous float32 arrays (None stands for an unused argument)."""
    return all(a is None or (a.dtype == "float32" and a.flags.c_contiguous) for a in arrays)
