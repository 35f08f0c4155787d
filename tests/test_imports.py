"""Imports flow one way (DESIGN.md section 1): a module of gpunet imports only from its own layer
and the layers below it, and no modules import one another in a cycle.

The imports are read from the source with ast, without running it: one inside a function (a
lazy import) counts as much as one at the top, since it is the same dependency, only later.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A name covers the module and everything below it; "gpunet" alone is the
# package's __init__, which re-exports the public names of the layers under it.
LAYERS = [
    ("leaves", ["gpunet.files", "gpunet.errors", "gpunet.random", "gpunet.validate", "gpunet.extras", "gpunet.paths",
                "gpunet.preprocess", "gpunet.parity_bound"]),  # no gpunet imports
    ("backend", ["gpunet.backend"]),
    # gpunet.distributed sits with the layers: it all-reduces their flat gradient buffers (gpunet.layers.flat),
    # as gpunet.optim updates them, and the fit loop (train, above) calls it every step
    ("layers", ["gpunet.layers", "gpunet.init", "gpunet.losses", "gpunet.optim", "gpunet.distributed"]),
    ("models and data", ["gpunet.models", "gpunet.data"]),
    ("checkpoint/export", ["gpunet.training.checkpoint", "gpunet.training.history", "gpunet.summary",
                           "gpunet.generate", "gpunet.export", "gpunet.export_torch"]),
    # the run (gpunet.training), but for its checkpoints and history, which export and generate read
    ("train", ["gpunet.training", "gpunet.recipes"]),
    # gpunet.testing (gn.testing.check_layer) checks layers with parity_bound's bound; the package re-exports it
    ("public api", ["gpunet", "gpunet.testing"]),
    ("tools", ["gpunet.parity", "gpunet.parity_command", "gpunet.parity_precision", "gpunet.search",
               "gpunet.benchmarks", "gpunet.predict"]),
    ("cli", ["gpunet.cli", "gpunet.__main__"]),
]


def module_sources(root: Path = SRC) -> dict[str, str]:
    """Dotted module name -> source, for every .py file of the gpunet package."""
    sources = {}
    for path in sorted((root / "gpunet").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources


def imports(name: str, source: str, modules) -> list[tuple[str, int]]:
    """(imported gpunet module, line) for each import in source; `from package import sub`
    counts as importing the module package.sub when there is one, else the package itself."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..layers import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return [(target, line) for target, line in found if target == "gpunet" or target.startswith("gpunet.")]


def _is_package(name: str, modules) -> bool:
    return any(other.startswith(name + ".") for other in modules)


def layer_of(name: str) -> int | None:
    """The index in LAYERS of the most specific entry covering name, or None."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            covers = name == prefix if prefix == "gpunet" else name == prefix or name.startswith(prefix + ".")
            if covers and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def graph(sources: dict[str, str]) -> dict[str, list[tuple[str, int]]]:
    return {name: imports(name, source, sources) for name, source in sources.items()}


def upward_imports(sources: dict[str, str]) -> list[str]:
    problems = []
    for name, targets in graph(sources).items():
        for target, line in targets:
            mine, theirs = layer_of(name), layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{name} (layer {LAYERS[mine][0]}) imports {target} (layer {LAYERS[theirs][0]}, "
                                f"above it) at line {line}")
    return problems


def cycles(sources: dict[str, str]) -> list[list[str]]:
    """Each group of modules that import one another, directly or through others (Tarjan)."""
    edges = {name: sorted({t for t, _ in targets if t in sources}) for name, targets in graph(sources).items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in edges[node]:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_module_has_a_layer():
    unplaced = [name for name in module_sources() if layer_of(name) is None]
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_no_module_imports_from_a_layer_above_it():
    problems = upward_imports(module_sources())
    assert not problems, "imports must point down (DESIGN.md section 1):\n" + "\n".join(problems)


def test_the_leaves_import_nothing_of_gpunet():
    sources = module_sources()
    leaves = [name for name in sources if layer_of(name) == 0]
    assert "gpunet.files" in leaves
    found = {name: [t for t, _ in imports(name, sources[name], sources)] for name in leaves}
    assert not any(found.values()), {name: targets for name, targets in found.items() if targets}


def test_no_import_cycles():
    found = cycles(module_sources())
    assert not found, "modules that import one another: " + "; ".join(" <-> ".join(group) for group in found)


@pytest.mark.parametrize("source, expected", [
    # the import this test was written against: the backend reaching up to checkpoint for a file helper
    ("from gpunet.training.checkpoint import atomic_write", "gpunet.backend.gemm_dispatch (layer backend) imports "
                                                   "gpunet.training.checkpoint (layer checkpoint/export, above it) at line 1"),
    ("def later():\n    from ..layers import base", "gpunet.backend.gemm_dispatch (layer backend) imports "
                                                     "gpunet.layers.base (layer layers, above it) at line 2"),
    ("import gpunet", "gpunet.backend.gemm_dispatch (layer backend) imports gpunet (layer public api, above it) "
                      "at line 1"),
])
def test_an_upward_import_is_found_lazy_or_relative(source, expected):
    sources = module_sources()
    sources["gpunet.backend.gemm_dispatch"] = source
    assert expected in upward_imports(sources)


def test_a_cycle_is_found():
    sources = {"gpunet": "", "gpunet.files": "from gpunet import runs", "gpunet.runs": "import gpunet.history",
               "gpunet.history": "from gpunet.files import atomic_write", "gpunet.errors": "import gpunet.errors"}
    assert cycles(sources) == [["gpunet.errors"], ["gpunet.files", "gpunet.history", "gpunet.runs"]]
