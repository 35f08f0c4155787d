"""The walker behind the real-CuPy tier, checked without the wheel (in the main suite): it finds
what a tiny source reaches on cupy, cupyx and xp, and not what it does not, so it cannot silently
find nothing; and the docstring signature lines the tier falls back on parse as CuPy writes them."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path

from tests.real_cupy import allowlist
from tests.real_cupy.probe_api import doc_signature
from tests.real_cupy.walker import DYNAMIC, INSTANCE, Call, references, references_in_source

SRC = Path(__file__).resolve().parents[2] / "src"

SYNTHETIC = '''
import numpy
import cupy
from cupyx import distributed as dist
from gpunet.backend.cuda_kernels import cupy_module as _cupy


def f(xp, ops, opts):
    xp.foo(bar=1)
    ops.xp.zeros(3, dtype="f")
    cupy.cuda.Device(0).use()
    dist.init_process_group(2, 0, backend="nccl", **opts)


def g(name):
    cp = cupy_status()[0]
    core = getattr(cp, "_core", None)
    hasattr(core, "set_compute_type")
    getattr(cp, name)


def h(np, thing):
    np.zeros(1)
    thing.zeros(1)
    numpy.ones(2)
    pick = lambda ops, x: ops.xp.maximum(x, 0, out=x)
    return _cupy().empty_like(thing)


class Gpu:
    xp = numpy

    def __init__(self):
        found, _ = cupy_status()
        self.xp = found

    def m(self, a, b, c):
        stream = self.xp.cuda.Stream(non_blocking=True)
        stream.begin_capture()
        return self.xp.matmul(a, b, out=c)


class Generic:
    xp = numpy

    def m(self):
        return self.xp.empty(1)
'''


@functools.cache
def gpunet_references():
    return references(SRC)  # (about a second: walked once for the tests below)


def found(refs):
    return {(r.root, r.path, r.call) for r in refs}


def test_walker_finds_what_a_small_source_reaches_and_nothing_else():
    refs = references_in_source(SYNTHETIC, "synthetic.py")
    assert found(refs) == {
        ("cupy", (), None),  # import cupy
        ("cupyx", ("distributed",), None),  # from cupyx import distributed
        ("xp", ("foo",), Call(0, ("bar",), False)),
        ("xp", ("zeros",), Call(1, ("dtype",), False)),
        ("cupy", ("cuda", "Device"), Call(1, (), False)),
        ("cupy", ("cuda", "Device", INSTANCE, "use"), Call(0, (), False)),
        ("cupyx", ("distributed", "init_process_group"), Call(2, ("backend",), True)),
        ("cupy", ("_core",), None),  # getattr(cp, "_core", None)
        ("cupy", ("_core", "set_compute_type"), None),  # hasattr(core, "set_compute_type")
        ("cupy", (DYNAMIC,), None),  # getattr(cp, name)
        ("cupy", ("cuda", "Stream"), Call(0, ("non_blocking",), False)),  # self.xp is CuPy in Gpu
        ("cupy", ("cuda", "Stream", INSTANCE, "begin_capture"), Call(0, (), False)),
        ("cupy", ("matmul",), Call(2, ("out",), False)),
        ("xp", ("empty",), Call(1, (), False)),  # Generic's self.xp: NumPy or CuPy
        ("cupy", ("empty_like",), Call(1, (), False)),  # _cupy() is cupy_module()
        ("xp", ("maximum",), Call(2, ("out",), False)),  # in a lambda
    }
    by_path = {(r.root, r.path): r for r in refs}
    assert by_path[("xp", ("foo",))].line == 9 and by_path[("xp", ("foo",))].scope == "f"
    assert by_path[("cupy", ("matmul",))].scope == "Gpu.m"


def test_walker_finds_gpunets_own_references():
    refs = gpunet_references()
    assert len(refs) > 50
    assert {r.root for r in refs} == {"cupy", "cupyx", "nvmath", "xp"}
    paths = {(r.root, r.path) for r in refs}
    assert ("cupy", ("RawModule",)) in paths  # cuda_kernels.module, through cupy_status()[0]
    assert ("cupy", ("cuda", "Device")) in paths
    assert ("xp", ("matmul",)) in paths  # Ops, through self.xp
    assert ("cupy", ("empty_like",)) in paths  # cuda_wrappers' _cupy(), cupy_module imported under another name
    raw_module = next(r for r in refs if r.path == ("RawModule",) and r.call)
    assert raw_module.file == "gpunet/backend/cuda_kernels.py" and set(raw_module.call.keywords) == {"code", "options"}


def test_every_allow_list_entry_names_something_the_walker_finds():
    refs = gpunet_references()
    for file, scope in allowlist.CUPY_ONLY_SCOPES:
        assert any(r.file == file and allowlist.cupy_only(r.file, r.scope) and r.root == "xp" for r in refs), scope
    for file, name in allowlist.DYNAMIC_NAMES:
        root, *path = name.split(".")
        assert any(r.file == file and r.root == root and r.path == (*path, DYNAMIC) for r in refs), name


class _Documented:
    """The shapes of CuPy's Cython signature lines (embedsignature), as docstrings."""

    def __init__(self, name, doc):
        self.__name__, self.__doc__ = name, doc


def test_docstring_signature_lines_parse_as_cupy_writes_them():
    ufunc = doc_signature(_Documented("cupy_add", "add(x1, x2, /, out=None, \\*, casting='same_kind', dtype=None)\n\n"
                                                  "Adds two arrays elementwise."))
    assert str(ufunc) == "(x1, x2, /, out=None, *, casting=None, dtype=None)"
    assert ufunc.bind(1, 2, out=3).arguments == {"x1": 1, "x2": 2, "out": 3}
    cython = doc_signature(_Documented("RawModule", "RawModule(str code=None, *, str path=None, tuple options=(), "
                                                    "str backend='nvrtc', name_expressions=None, jitify=None)"))
    assert list(cython.parameters) == ["code", "path", "options", "backend", "name_expressions", "jitify"]
    assert cython.parameters["options"].kind is inspect.Parameter.KEYWORD_ONLY
    optional = doc_signature(_Documented("add", "add(x1, x2, /, out=None, *, subok=True[, signature])"))
    assert optional.parameters["signature"].default is None
    assert doc_signature(_Documented("set", "_ndarray_base.set(self, arr, stream=None)\n\nCopies")).bind(0, 1)
    assert doc_signature(_Documented("erf", "Error function.\n\n.. seealso:: scipy.special.erf")) is None
    assert doc_signature(_Documented("other", "add(x1, x2)")) is None  # a line about another function
