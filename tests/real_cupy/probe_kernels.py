"""Compiles every kernel family as gpunet builds it (cuda_kernels.module: cupy.RawModule with
gpunet's source and NVRTC_OPTIONS), through the REAL CuPy's own NVRTC path, for each
architecture given (python probe_kernels.py 80 90 100); prints one JSON object.

Without a GPU, cupy.RawModule cannot compile: it asks the device for its architecture. So
RawModule is replaced, for this process only, by a recorder that keeps the arguments gpunet
passes and compiles them with the call RawModule itself makes (cupy/_core/raw.pyx,
_get_raw_module: cupy._core.core.compile_with_cache(code, options, prepend_cupy_headers=False,
...)) plus arch=, which that call accepts. Two things CuPy does need a device for are stepped
around: the per-device memo of _get_arch_for_options_for_nvrtc (it asks which device is current;
the function itself, given an arch, does not touch one), and loading the cubin after it is
written to the kernel cache (a fresh CUPY_CACHE_DIR, so each cubin there is this run's). Each
cubin is then read: an ELF for that SM, holding every kernel the .cu file defines.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A fresh kernel cache (inside the caller's CUPY_CACHE_DIR, if set): every cubin in it is this run's.
CACHE = Path(tempfile.mkdtemp(prefix="gpunet-real-cupy-kernels-", dir=os.environ.get("CUPY_CACHE_DIR")))
os.environ["CUPY_CACHE_DIR"] = str(CACHE)  # before cupy is imported: it reads the variable once

import cupy  # noqa: E402
from cupy.cuda import compiler  # noqa: E402

compiler._get_arch_for_options_for_nvrtc = compiler._get_arch_for_options_for_nvrtc.__wrapped__

from gpunet.backend import cuda_kernels, cuda_wrappers, cuda_wrappers_sequence  # noqa: E402

# What cupy.RawModule hands compile_with_cache for the arguments gpunet does not give it (its
# signature's defaults; jitify=None, "not asked for", reaches compile_with_cache as False).
RAW_MODULE_DEFAULTS = {"backend": "nvrtc", "translate_cucomplex": False, "enable_cooperative_groups": False,
                       "name_expressions": None, "jitify": False}


def arch_pinned_raw_module(arch: str, made: list):
    class ArchPinnedRawModule:
        """Stands for cupy.RawModule: what gpunet passes it, compiled for `arch`."""

        def __init__(self, code=None, *, path=None, options=(), **kwargs):
            unknown = set(kwargs) - set(RAW_MODULE_DEFAULTS)
            if path is not None or unknown:
                raise TypeError(f"the probe compiles code= with {sorted(RAW_MODULE_DEFAULTS)} only, not {unknown}")
            self.code, self.options, self.kwargs = code, tuple(options), {**RAW_MODULE_DEFAULTS, **kwargs}
            self.log, self.cubin = io.StringIO(), None
            made.append(self)

        def compile(self):
            before = set(CACHE.glob("*.cubin"))
            self.load_error = ""
            try:
                cupy._core.core.compile_with_cache(self.code, self.options, arch=arch, prepend_cupy_headers=False,
                                                   log_stream=self.log, **self.kwargs)
            except compiler.CompileException:
                raise
            except Exception as exc:  # noqa: BLE001 - loading the cubin needs a device; compiling did not
                self.load_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            written = set(CACHE.glob("*.cubin")) - before
            if len(written) != 1:
                raise RuntimeError(f"NVRTC wrote {len(written)} cubins for one module ({self.load_error or 'loaded'})")
            self.cubin = written.pop().read_bytes()

    return ArchPinnedRawModule


def cubin_sm(payload: bytes) -> int | None:
    """The SM a CUDA ELF is built for (e_flags bits 8-15), after the hash CuPy's cache puts first."""
    start = payload.find(b"\x7fELF")
    if start < 0 or payload[start + 7] != 0x41:  # EI_OSABI 0x41: CUDA
        return None
    return (struct.unpack_from("<I", payload, start + 48)[0] >> 8) & 0xFF


def declared_kernels() -> dict[str, set[str]]:
    """family -> the kernels gpunet's wrappers declare (and so launch)."""
    found: dict[str, set[str]] = {}
    for module in (cuda_wrappers, cuda_wrappers_sequence):
        for value in vars(module).values():
            if isinstance(value, cuda_kernels.Kernel):
                found.setdefault(value.family, set()).add(value.name)
    return found


def main(archs: list[str]) -> None:
    families = sorted(p.stem for p in (ROOT / "kernels").glob("*.cu"))
    declared = declared_kernels()
    real_raw_module = cupy.RawModule
    result = {"cupy": cupy.__version__, "nvrtc": ".".join(map(str, compiler._get_nvrtc_version())),
              "families": families, "options": list(cuda_kernels.NVRTC_OPTIONS), "archs": {}}
    for arch in archs:
        made: list = []
        cupy.RawModule = arch_pinned_raw_module(arch, made)
        cuda_kernels.clear_caches()
        compiled, failures, warnings = [], {}, {}
        for family in families:
            try:
                module = cuda_kernels.module(family)
            except Exception as exc:  # noqa: BLE001 - each family's failure is reported, the others still run
                failures[family] = f"{type(exc).__name__}: {exc}"
                continue
            defined = set(re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)', cuda_kernels.source(family)))
            absent = sorted(n for n in defined | declared.get(family, set()) if b".text." + n.encode() + b"\0"
                            not in module.cubin)
            sm = cubin_sm(module.cubin)
            if sm != int(arch) or absent or not defined:
                failures[family] = f"cubin for sm_{sm}, kernels missing from it: {absent}, defined: {len(defined)}"
                continue
            if module.log.getvalue().strip():
                warnings[family] = module.log.getvalue().strip()
            compiled.append({"family": family, "kernels": len(defined), "cubin_bytes": len(module.cubin),
                             "options": list(module.options), "raw_module_kwargs": module.kwargs,
                             "load": module.load_error})
        result["archs"][arch] = {"compiled": compiled, "failures": failures, "warnings": warnings}
    cupy.RawModule = real_raw_module
    cuda_kernels.clear_caches()
    shutil.rmtree(CACHE, ignore_errors=True)  # this run's cubins: read above, of no use after it
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:] or ["80", "90", "100"])
