"""The optional parts of gpunet: which are installed, and the extra that adds each (`gpunet info`).

Imports nothing (find_spec only looks), so asking costs nothing and changes nothing."""
from __future__ import annotations

import importlib.metadata
import importlib.util

# (module, distribution whose version is shown, extra, what it adds)
OPTIONAL = (
    ("cupy", None, "cuda12 or cuda13", "the GPU (CuPy with the CUDA toolkit, for the driver's CUDA 12 or 13)"),
    ("nvmath", "nvmath-python", "cuda12-lt or cuda13-lt", "cuBLASLt's fused epilogues as a GEMM candidate on the GPU"),
    ("matplotlib", "matplotlib", "plot", "history.png and gpunet bench --plot"),
    ("torch", "torch", "bench", "gpunet bench's PyTorch side"),
    ("mpi4py", "mpi4py", "mpi", "data-parallel training with mpiexec"),
    ("optuna", "optuna", "search", "gpunet search"),
)


def present(module: str) -> bool:
    """Whether module can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(module: str, distribution: str | None) -> str:
    names = [distribution] if distribution else [d for d in importlib.metadata.packages_distributions().get(module, [])]
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


def optional_parts() -> list[str]:
    """One line per optional part: its version, or how to add it."""
    lines = []
    for module, distribution, extra, what in OPTIONAL:
        if present(module):
            lines.append(f"{module}: {_version(module, distribution)} ({what})")
        else:
            how = " or ".join(f"pip install 'gpunet[{e}]'" for e in extra.split(" or "))
            lines.append(f"{module}: missing, for {what}: {how}")
    return lines
