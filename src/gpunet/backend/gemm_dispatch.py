"""Choosing, by measurement, how a Dense product with an epilogue runs on the GPU.

For each class of problem (M, N, K rounded up to powers of two, and the epilogue) the first call
times every candidate (our fused kernel; cuBLAS followed by a separate epilogue) and remembers
the fastest. Choices persist in a JSON file per device, per version of the kernel sources and per
TF32 mode (TF32 changes cuBLAS's speed, and so the winner), so a changed kernel or mode is
measured again; a damaged file is ignored and rewritten.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

from gpunet import paths
from gpunet.files import atomic_write


def default_cache_path() -> Path:
    return paths.cache_dir() / "gemm_dispatch.json"


def size_class(m: int, n: int, k: int, epilogue) -> str:
    def up(v):
        return 1 << max(0, int(v - 1).bit_length())
    return f"{up(m)}x{up(n)}x{up(k)}:{epilogue or 'bias'}"


def source_hash(*sources: str) -> str:
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


class GemmDispatch:
    """choose(m, n, k, epilogue, candidates) -> the name of the fastest candidate for that class.

    candidates() -> {name: zero-argument callable running the whole product}; it is called only
    when the class has not been measured yet, so a known class costs a dictionary lookup.
    measure(fn) -> seconds (on the GPU it must synchronise); by default the median of 5 timed
    calls after 2 warm-ups. tf32: whether cuBLAS's float32 products run on TF32 tensor cores
    (devices.configure_tf32), part of the key under which choices are remembered.
    """

    def __init__(self, device_key: str, kernels_hash: str, path: Path | None = None, measure=None, *,
                 tf32: bool):
        self.key = f"{device_key}|{'tf32' if tf32 else 'fp32'}|{kernels_hash}"
        self.path = Path(path) if path is not None else default_cache_path()
        self.measure = measure or _median_time
        self.choices = self._load()

    def choose(self, m: int, n: int, k: int, epilogue, candidates) -> str:
        cls = size_class(m, n, k, epilogue)
        chosen = self.choices.get(cls)
        if chosen is None:
            timings = {name: self.measure(fn) for name, fn in candidates().items()}
            chosen = min(timings, key=timings.get)
            self.choices[cls] = chosen
            self._save()
        return chosen

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        choices = data.get(self.key, {}) if isinstance(data, dict) else {}
        return dict(choices) if isinstance(choices, dict) else {}

    def _save(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[self.key] = self.choices
        try:
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError:
            pass  # a read-only home only costs re-measuring in the next process


def agreeing(paths: dict, args, tolerance: float, xp) -> dict:
    """The candidates to time: the paths (name -> path(*args) -> y) whose result agrees with the
    "fused" one (gpunet's kernel, which the suite checks against the CPU) within tolerance, relative
    to its largest finite magnitude, each as a call. Another library's path that disagrees (a layout
    or an epilogue read otherwise than its documentation says) is never timed, and a warning says
    so. A NaN or infinity where the kernel has the same (a batch with a NaN) agrees. Runs once per
    size class, so its host reads cost nothing later."""
    reference = paths["fused"](*args)
    scale = float(xp.abs(xp.where(xp.isfinite(reference), reference, 0)).max()) or 1.0
    chosen = {}
    for name, path in paths.items():
        if name != "fused":
            got = path(*args)
            same = (got == reference) | (xp.isnan(got) & xp.isnan(reference))
            difference = float(xp.where(same, 0, xp.abs(got - reference)).max()) / scale
            if not difference <= tolerance:
                warnings.warn(f"gemm dispatch: the {name} path differs from gpunet's kernel by {difference:.1e} "
                              f"(relative) for x {args[0].shape}, weight {args[1].shape}; it is not used",
                              RuntimeWarning, stacklevel=2)
                continue
        chosen[name] = lambda path=path: path(*args)
    return chosen


def _median_time(fn, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
