"""The few references the walker finds that are not checked as written, each with its reason.
Anything not listed here is checked against the installed packages as the walker found it."""
from __future__ import annotations

# xp references in code that runs only on the GPU: checked against CuPy alone (NumPy has no `cuda`).
# Keyed by (file, class or function the scope starts with).
CUPY_ONLY_SCOPES = {
    ("gpunet/training/cuda_graph.py", "GraphedStep"):
        "GraphedStep is built on ops_for_device('gpu') (CUDA graphs exist only there): its xp is always CuPy",
}

# getattr(module, <a computed name>): deliberately dynamic; the names come from a table in gpunet,
# and each name in that table is checked instead. Keyed by (file, the object the name is looked up on).
DYNAMIC_NAMES = {
    ("gpunet/backend/cublaslt.py", "nvmath.linalg.advanced.MatmulEpilog"):
        ("gpunet.backend.cublaslt", "EPILOGS", "gpunet's activation -> the MatmulEpilog member's name"),
}


def cupy_only(file: str, scope: str) -> bool:
    return any(file == f and (scope == s or scope.startswith(s + ".")) for f, s in CUPY_ONLY_SCOPES)


# Modules that bind a CUDA library the tier does not install (cupy-cuda13x without its [ctk] libraries):
# CuPy imports them on first use and raises ImportError without the library. Their names and signatures
# are read instead from the compiled binding itself (Cython keeps each function's signature line and
# each enum member's name in it). Keyed by (module, attribute).
LIBRARY_BINDINGS = {
    ("cupy.cuda", "cublas"): ("cupy_backends.cuda.libs.cublas", "needs libcublas: gpunet's cublasGemmEx path"),
}
