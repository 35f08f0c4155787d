"""Checks every reference walker.py finds in src/gpunet against the REAL packages: each attribute
exists (on NumPy and CuPy both for xp), and each call binds to the callee's signature (its
positional count and keywords). Run in a fresh interpreter that imports the real cupy (the test
suite's stand-in replaces `cupy` in sys.modules): python probe_api.py prints one JSON object.

A signature comes from inspect.signature, else from the signature line CuPy's Cython functions
carry at the top of their docstring (`add(x1, x2, /, out=None, \\*, casting='same_kind', dtype=None)`);
a call whose callee has neither is 'unverifiable' and counted. A path that goes on past a call is
followed when the callee is a class (its instance's attributes are the class's) or names the
class it returns (annotation, or the docstring's Returns section: `cupy.ndarray: ...`); past
any other call it is 'not followed' (the call itself is checked by its own reference).
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import typing
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.real_cupy import allowlist  # noqa: E402
from tests.real_cupy.walker import DYNAMIC, INSTANCE, Reference, references, references_in_source  # noqa: E402

MISSING = object()


def lookup(obj, name: str, via_instance: bool):
    """obj.name, or the submodule obj.name when obj is a module that has not imported it yet (a binding of a
    CUDA library the tier lacks: read from the compiled module, CompiledBinding)."""
    try:
        return getattr(obj, name)
    except AttributeError:
        pass
    except ImportError:
        entry = allowlist.LIBRARY_BINDINGS.get((getattr(obj, "__name__", ""), name))
        if entry is None:
            raise
        return CompiledBinding(entry[0])
    if inspect.ismodule(obj) and not via_instance:
        try:
            return importlib.import_module(f"{obj.__name__}.{name}")
        except ImportError:
            pass
    return MISSING


class CompiledBinding:
    """A Cython module that cannot be imported here (its CUDA library is missing), as far as its compiled file
    tells: each function with its signature line as its docstring (doc_signature reads it), each enum member
    (its value unknown: 0). An attribute it does not name is missing."""

    def __init__(self, module: str):
        import importlib.util
        self.__name__ = module
        text = Path(importlib.util.find_spec(module).origin).read_bytes().decode("latin-1")
        self._signatures = {m.group(1): m.group(0) for m in re.finditer(r"\b(\w+)\(([\w ,*]*)\)(?: -> \w+)?", text)}
        self._members = set(re.findall(r"__pyx_e_\w*?\d%s_(\w+)" % re.escape(module.rsplit(".", 1)[-1]), text))

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._signatures:
            def function(*args, **kwargs):
                raise RuntimeError(f"{self.__name__}.{name} cannot run here: its CUDA library is missing")
            function.__name__, function.__doc__ = name, self._signatures[name]
            return function
        if name in self._members:
            return 0
        raise AttributeError(name)


_RETURNS = (re.compile(r"Returns:\s*\n\s+~?([\w.]+)\s*:"),  # CuPy's: "Returns:\n    cupy.ndarray: ..."
            re.compile(r"Returns\n\s*-+\n\s*\w+ : ([\w.]+)"))  # NumPy's: "Returns\n-------\nout : ndarray"


def returned_class(func, module):
    """The class func returns: its return annotation (`-> NDArray[Any]`: cupy.ndarray), else the
    first type its docstring's Returns section names (looked up in func's module, then in
    `module`, the package the path started from); None when neither names a class."""
    try:
        hint = typing.get_type_hints(func).get("return")
    except Exception:  # noqa: BLE001 - annotations that do not evaluate: no declared return type
        hint = None
    hint = typing.get_origin(hint) or hint
    if isinstance(hint, type):
        return hint
    doc = getattr(func, "__doc__", None) or ""
    for pattern in _RETURNS:
        if (match := pattern.search(doc)) is None:
            continue
        head, *rest = match.group(1).split(".")
        homes = [sys.modules.get(getattr(func, "__module__", None) or ""), module]
        if head in sys.modules and rest:
            homes.insert(0, sys.modules[head])
            head, *rest = rest
        for home in homes:
            found = getattr(home, head, None)
            for name in rest:
                found = getattr(found, name, None)
            if isinstance(found, type):
                return found
    return None


def walk(module, path: tuple[str, ...]):
    """(status, object, reached through an instance, detail) for module.path."""
    obj, via_instance, done = module, False, [module.__name__]
    for index, name in enumerate(path):
        if via_instance and inspect.isdatadescriptor(obj):  # an instance's attribute: its value's type is unknown
            return "not_followed", obj, via_instance, f"past the value of {'.'.join(done)}"
        if name == INSTANCE:
            if isinstance(obj, type):
                via_instance = True
            elif (cls := returned_class(obj, module)) is not None:
                obj, via_instance = cls, True
            else:
                return "not_followed", obj, via_instance, f"past the result of {'.'.join(done)}()"
            done.append(INSTANCE)
            continue
        found = lookup(obj, name, via_instance)
        if found is MISSING:
            where = f"{'an instance of ' if via_instance else ''}{'.'.join(d for d in done if d != INSTANCE)}"
            return "missing", obj, via_instance, f"{where} has no attribute {name!r}"
        obj, via_instance = found, via_instance and not inspect.isclass(found)
        done.append(name)
    return "ok", obj, via_instance, ""


_DOC_LINE = re.compile(r"^([\w.]+)\((.*)\)\s*(->.*)?$")


def doc_signature(obj) -> inspect.Signature | None:
    """The signature line at the top of a Cython docstring, as an inspect.Signature."""
    name = getattr(obj, "__name__", None) or type(obj).__name__
    for line in (getattr(obj, "__doc__", None) or "").strip().splitlines()[:2]:
        match = _DOC_LINE.match(line.strip().replace("\\*", "*"))
        written = match.group(1).split(".")[-1] if match else None
        if written and (name == written or name.endswith("_" + written)):  # a CuPy ufunc is named cupy_add
            return _parameters(match.group(2))
    return None


def _split_top_level(text: str) -> list[str]:
    parts, depth, current, quote = [], 0, "", None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    return [*parts, current]


def _parameters(text: str) -> inspect.Signature | None:
    params, kind, seen_default, optional = [], inspect.Parameter.POSITIONAL_OR_KEYWORD, False, False
    P = inspect.Parameter
    for raw in _split_top_level(text.replace("[,", ",[")):  # "subok=True[, signature]": optional parameters
        token = raw.strip()
        if token.startswith("["):
            optional, token = True, token.lstrip("[").strip()
        token = token.rstrip("]").strip()
        if not token:
            continue
        if token == "/":
            params = [p.replace(kind=P.POSITIONAL_ONLY) for p in params]
            continue
        if token == "*":
            kind = P.KEYWORD_ONLY
            continue
        head, eq, _ = token.partition("=")
        name = head.split(":")[0].split()[-1] if head.split(":")[0].split() else ""
        if name.startswith("**"):
            params.append(P(name[2:] or "kwargs", P.VAR_KEYWORD))
            continue
        if name.startswith("*"):
            params.append(P(name[1:] or "args", P.VAR_POSITIONAL))
            kind = P.KEYWORD_ONLY
            continue
        if not name.isidentifier():
            return None
        has_default = bool(eq) or optional or (seen_default and kind is not P.KEYWORD_ONLY)
        seen_default |= has_default
        params.append(P(name, kind, default=None if has_default else P.empty))
    try:
        return inspect.Signature(params)
    except ValueError:
        return None


def signature(obj) -> tuple[inspect.Signature | None, str]:
    try:
        return inspect.signature(obj), "inspect"
    except (TypeError, ValueError):
        pass
    sig = doc_signature(obj)
    if sig is None and isinstance(obj, type):
        sig = doc_signature(obj.__init__) if obj.__init__ is not object.__init__ else None
    return (sig, "docstring") if sig is not None else (None, "")


def check_call(obj, via_instance: bool, call: dict) -> tuple[str, str]:
    """('ok' | 'unverifiable' | 'incompatible', detail) for calling obj as the source does."""
    if not callable(obj):
        return "incompatible", f"{obj!r} is not callable"
    sig, how = signature(obj)
    if sig is None:
        return "unverifiable", "no signature (inspect or docstring)"
    params = list(sig.parameters.values())
    owner = getattr(obj, "__self__", None)  # a bound method's signature line may still list self
    bound = via_instance or (owner is not None and not inspect.ismodule(owner))
    skip_self = bound and bool(params) and params[0].name == "self"
    keywords = {k: None for k in call["keywords"]}
    try:
        if call["starred"]:  # *args / **kwargs: only the keywords written out can be checked
            names = {p.name for p in params if p.kind not in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)}
            takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
            unknown = [k for k in keywords if k not in names and not takes_any]
            if unknown:
                raise TypeError(f"unexpected keyword(s) {unknown}")
        else:
            sig.bind(*([None] * (call["positional"] + skip_self)), **keywords)
    except TypeError as exc:
        return "incompatible", f"{exc} (signature {sig}, from {how})"
    return "ok", how


def targets(ref: Reference):
    if ref.root != "xp":
        return [(ref.root, importlib.import_module(ref.root))]
    if allowlist.cupy_only(ref.file, ref.scope):
        return [("cupy", importlib.import_module("cupy"))]
    return [("numpy", importlib.import_module("numpy")), ("cupy", importlib.import_module("cupy"))]


def check(ref: Reference) -> list[dict]:
    results = []
    for label, module in targets(ref):
        if DYNAMIC in ref.path:
            results += check_dynamic(ref, label, module)
            continue
        status, obj, via_instance, detail = walk(module, ref.path)
        if status == "ok" and ref.call is not None:
            status, detail = check_call(obj, via_instance, ref.call.__dict__)
        name = ".".join((label, *ref.path))
        results.append({"api": name, "call": None if ref.call is None else ref.call.__dict__, "status": status,
                        "detail": detail, "where": ref.where()})
    return results


def check_dynamic(ref: Reference, label: str, module) -> list[dict]:
    prefix = ref.path[:ref.path.index(DYNAMIC)]
    name = ".".join((label, *prefix))
    entry = allowlist.DYNAMIC_NAMES.get((ref.file, name))
    if entry is None:
        return [{"api": f"{name}.*", "call": None, "status": "missing", "where": ref.where(),
                 "detail": "getattr with a computed name that allowlist.DYNAMIC_NAMES does not list"}]
    table = getattr(importlib.import_module(entry[0]), entry[1])
    results = []
    for member in sorted(set(table.values())):
        status, _, _, detail = walk(module, (*prefix, member))
        results.append({"api": f"{name}.{member}", "call": None, "status": status, "where": ref.where(),
                        "detail": detail or f"named by {entry[0]}.{entry[1]}"})
    return results


def main(argv: list[str]) -> None:
    warnings.simplefilter("ignore")  # cupyx.distributed warns that NCCL is missing: not what is checked here
    # --source FILE: that one file instead of src/ (the tier's check that the probe finds what is wrong)
    refs = references_in_source(Path(argv[1]).read_text(), "synthetic.py") if argv[:1] == ["--source"] \
        else references(ROOT / "src")
    results = [result for ref in refs for result in check(ref)]
    by_status: dict[str, int] = {}
    for result in results:
        by_status[result["status"]] = by_status.get(result["status"], 0) + 1
    checked = {(r["api"], json.dumps(r["call"], sort_keys=True)) for r in results if r["status"] == "ok"}
    import cupy
    import numpy
    print(json.dumps({
        "cupy": cupy.__version__, "numpy": numpy.__version__, "cupy_file": cupy.__file__,
        "references": len(refs), "roots": sorted({r.root for r in refs}),
        "by_root": {root: sum(r.root == root for r in refs) for root in sorted({r.root for r in refs})},
        "results": results, "by_status": by_status, "distinct_checked": len(checked),
        "signature_sources": {how: sum(r["status"] == "ok" and r["call"] is not None and r["detail"] == how
                                       for r in results) for how in ("inspect", "docstring")},
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
