"""Every attribute, call and keyword gpunet's source reaches on cupy, cupyx, nvmath and on the
array module `xp`, found by walking the source with `ast` (no hand list): the real-CuPy tier
(probe_api.py) then checks each against the installed packages.

What counts as one of those modules (bindings are per scope and flow-insensitive: a name
assigned one of them anywhere in a function is taken as it everywhere in that function):
- a name bound by `import cupy`, `import cupyx.scipy as s`, `from cupyx import distributed as d`,
  `from nvmath.linalg.advanced import Matmul`;
- what gpunet's own helpers hand out: `cupy_status()[0]`, the first name unpacked from
  `cupy_status()`, `cupy_module()` (src/gpunet/backend/devices.py, cuda_kernels.py), also when
  imported under another name (`from ... import cupy_module as _cupy`);
- a name assigned any of the above, an attribute of it, `getattr(it, "name"[, default])`, or an
  instance of a class of it (`s = cupy.cuda.Stream()`; `"()"` in a path marks the instance);
- `self.NAME` in a class whose methods assign `self.NAME` one of the above (CupyOps' `self.xp = cupy`);
- a parameter named cupy, cupyx or nvmath (`configure_tf32(cupy)`);
- `xp`: a name `xp` (parameters, locals) or an attribute `.xp` of anything (`ops.xp`, `self.xp`,
  `device.xp`) that is not bound to CuPy as above: NumPy or CuPy, so it must exist in both.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

MODULES = ("cupy", "cupyx", "nvmath")
PROVIDERS = ("cupy_status", "cupy_module")  # gpunet's functions that hand out the cupy module
INSTANCE = "()"  # in a path: what follows is looked up on an instance of the class before it
DYNAMIC = "*"  # in a path: getattr(module, <a computed name>)


@dataclass(frozen=True)
class Call:
    positional: int  # positional arguments, not counting *args
    keywords: tuple[str, ...]  # explicit keyword names
    starred: bool  # *args or **kwargs present: only the explicit keywords can be checked


@dataclass(frozen=True)
class Reference:
    file: str  # relative to the folder walked, e.g. "gpunet/backend/devices.py"
    line: int
    scope: str  # "Class.method", "function" or "" (module level)
    root: str  # "cupy", "cupyx", "nvmath" or "xp"
    path: tuple[str, ...]  # attribute names after the root, INSTANCE and DYNAMIC as markers
    call: Call | None = None

    @property
    def dotted(self) -> str:
        return ".".join((self.root, *self.path))

    def where(self) -> str:
        return f"{self.file}:{self.line}" + (f" ({self.scope})" if self.scope else "")


Bound = tuple  # (root, path): what an expression is, when it is one of the modules or reached from one


def _call_shape(node: ast.Call) -> Call:
    starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
    return Call(sum(not isinstance(a, ast.Starred) for a in node.args),
                tuple(k.arg for k in node.keywords if k.arg is not None), starred)


def _const_str(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Scope:
    """One function (or the module): its own bindings, and the scopes it sees."""

    def __init__(self, node, name: str, outer: _Scope | None, cls: dict | None):
        self.node, self.name, self.outer, self.cls = node, name, outer, cls
        self.names: dict[str, Bound | None] = {}  # None: a parameter, bound to nothing known

    def lookup(self, name: str) -> Bound | None:
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.outer
        return None


def _own_nodes(node):
    """The nodes of a scope's body, not those of the functions and classes defined in it."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(child))


class _Walker:
    def __init__(self, tree: ast.Module, file: str):
        self.tree, self.file = tree, file
        self.refs: list[Reference] = []
        self.parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        self._own_cache: dict = {}  # scope node -> its own nodes (walked once, read by every round)
        self.aliases = {alias.asname: alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                        for alias in node.names if alias.name in PROVIDERS and alias.asname}

    # what an expression is
    def resolve(self, node, scope: _Scope) -> Bound | None:
        if isinstance(node, ast.Name):
            found = scope.lookup(node.id)
            return found if found is not None else ("xp", ()) if node.id == "xp" else None
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and scope.cls is not None \
                    and node.attr in scope.cls:
                return scope.cls[node.attr]
            base = self.resolve(node.value, scope)
            if base is not None:
                return base[0], (*base[1], node.attr)
            return ("xp", ()) if node.attr == "xp" else None
        if isinstance(node, ast.Subscript):  # cupy_status()[0]
            if self._is_call_to(node.value, "cupy_status") and getattr(node.slice, "value", None) == 0:
                return "cupy", ()
            return None
        if isinstance(node, ast.Call):
            if self._is_call_to(node, "cupy_module"):
                return "cupy", ()
            if self._is_call_to(node, "getattr") and len(node.args) >= 2:
                base = self.resolve(node.args[0], scope)
                if base is not None:
                    return base[0], (*base[1], _const_str(node.args[1]) or DYNAMIC)
                return None
            base = self.resolve(node.func, scope)
            return (base[0], (*base[1], INSTANCE)) if base is not None else None
        return None

    def _is_call_to(self, node, name: str) -> bool:
        """A call of `name`, or of a provider imported under another name (cupy_module as _cupy)."""
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and self.aliases.get(node.func.id, node.func.id) == name

    # bindings
    def _bind_imports(self, node, scope: _Scope, record: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                root, *rest = alias.name.split(".")
                if root not in MODULES:
                    continue
                if alias.asname:
                    scope.names[alias.asname] = (root, tuple(rest))
                else:
                    scope.names[root] = (root, ())
                if record:
                    self._add(node, scope, (root, tuple(rest)))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            root, *rest = node.module.split(".")
            if root not in MODULES:
                return
            for alias in node.names:
                bound = (root, (*rest, alias.name))
                scope.names[alias.asname or alias.name] = bound
                if record:
                    self._add(node, scope, bound)

    def _bind_targets(self, target, value, scope: _Scope, cls: dict | None) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                for t, v in zip(target.elts, value.elts):
                    self._bind_targets(t, v, scope, cls)
            elif self._is_call_to(value, "cupy_status") and target.elts:  # cupy, reason = cupy_status()
                self._bind_targets(target.elts[0], ast.Subscript(value, ast.Constant(0)), scope, cls)
            return
        bound = self.resolve(value, scope)
        if bound is None or bound == ("xp", ()):  # `xp = numpy` does not narrow a name: any xp stays generic
            return
        if isinstance(target, ast.Name):
            scope.names[target.id] = bound
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                and target.value.id == "self" and cls is not None:
            cls[target.attr] = bound

    def _own(self, node) -> list:
        if node not in self._own_cache:
            self._own_cache[node] = list(_own_nodes(node))
        return self._own_cache[node]

    def _collect_bindings(self, scope: _Scope) -> None:
        binders = [n for n in self._own(scope.node)
                   if isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.withitem))]
        for _ in range(3):  # a name bound from another name bound later in the text: a few rounds settle it
            for node in binders:
                self._bind_imports(node, scope, record=False)
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        self._bind_targets(target, node.value, scope, scope.cls)
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    self._bind_targets(node.target, node.value, scope, scope.cls)
                elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                    self._bind_targets(node.optional_vars, node.context_expr, scope, scope.cls)

    # references
    def _add(self, node, scope: _Scope, bound: Bound, call: Call | None = None) -> None:
        self.refs.append(Reference(self.file, node.lineno, scope.name, bound[0], tuple(bound[1]), call))

    def _record(self, scope: _Scope) -> None:
        for node in self._own(scope.node):
            self._bind_imports(node, scope, record=True)
            if isinstance(node, ast.Call):
                if self._is_call_to(node, "hasattr") and len(node.args) == 2 and _const_str(node.args[1]):
                    base = self.resolve(node.args[0], scope)
                    if base is not None:
                        self._add(node, scope, (base[0], (*base[1], _const_str(node.args[1]))))
                    continue
                if self._is_call_to(node, "getattr"):
                    bound = self.resolve(node, scope)
                    if bound is not None:
                        self._add(node, scope, bound)
                    continue
                bound = self.resolve(node.func, scope)
                if bound is not None and bound[1]:  # (calling the bare module `xp(...)` is not an API)
                    self._add(node, scope, bound, _call_shape(node))
            elif isinstance(node, ast.Attribute):
                parent = self.parents.get(node)
                if isinstance(parent, ast.Attribute) or (isinstance(parent, ast.Call) and parent.func is node):
                    continue  # not the whole chain, or a call (recorded with its arguments above)
                if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in (scope.cls or {}):
                    continue  # self.NAME itself: a name for something recorded where it was made
                bound = self.resolve(node, scope)
                if bound is not None and bound[1]:
                    self._add(node, scope, bound)

    def walk(self) -> list[Reference]:
        self._scope(self.tree, "", None, None)
        return self.refs

    def _scope(self, node, name: str, outer: _Scope | None, cls: dict | None) -> None:
        scope = _Scope(node, name, outer, cls)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                # a parameter is whatever the caller passes (it hides outer bindings); one named cupy is CuPy
                scope.names[arg.arg] = (arg.arg, ()) if arg.arg in MODULES else None
        self._collect_bindings(scope)
        self._record(scope)
        for child in self._own(node):
            if isinstance(child, ast.ClassDef):
                self._class(child, f"{name}.{child.name}" if name else child.name, scope)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._scope(child, f"{name}.{child.name}" if name else child.name, scope, None)
            elif isinstance(child, ast.Lambda):
                self._scope(child, f"{name}.<lambda>" if name else "<lambda>", scope, None)

    def _class(self, node: ast.ClassDef, name: str, outer: _Scope) -> None:
        attributes: dict[str, Bound] = {}  # self.NAME bound to one of the modules in any method
        methods = [c for c in node.body if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for _ in range(2):  # a method may bind self.NAME from another self.NAME
            for method in methods:
                self._collect_bindings(_Scope(method, name, outer, attributes))
        body = _Scope(node, name, outer, None)  # the class body itself (its names are not seen by methods)
        self._collect_bindings(body)
        self._record(body)
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._scope(child, f"{name}.{child.name}", outer, attributes)
            elif isinstance(child, ast.ClassDef):
                self._class(child, f"{name}.{child.name}", outer)
        for child in self._own(node):
            if isinstance(child, ast.Lambda):  # a lambda in the class body (one in a method is the method's)
                self._scope(child, f"{name}.<lambda>", outer, None)


def references_in_source(text: str, file: str = "<source>") -> list[Reference]:
    return _Walker(ast.parse(text), file).walk()


def references(folder: Path) -> list[Reference]:
    """Every reference in the .py files under folder (src/ for gpunet: paths read gpunet/...)."""
    found: list[Reference] = []
    for path in sorted(folder.rglob("*.py")):
        found += references_in_source(path.read_text(encoding="utf-8"), path.relative_to(folder).as_posix())
    return found
