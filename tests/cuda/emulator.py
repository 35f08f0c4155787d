"""A CUDA kernel emulator for machines without a GPU: any `extern "C" __global__` kernel of a .cu
source, compiled by g++ against tests/cuda/emulator.h and launched like cuLaunchKernel.

Each CUDA thread is a fiber; warps are 32 consecutive threads and shuffles synchronise only their
warp; blocks and warps run in a seeded, shuffled order (tests/cuda/runtime.h has the details).
Launch limits are sm_90's and checked here, before anything runs, as a GPU refuses a launch.
With tsan=True the module is built with ThreadSanitizer, which then reports data races between
the emulated threads (the process must have the TSan runtime preloaded: tsan_environment()).
`defines` are -DNAME=value flags, given to g++ (and nvcc) as NVRTC gets them from gpunet
(gpunet.backend.cuda_kernels.DEFINE_FLAGS for gpunet's kernels). A source's `#include "common.cuh"`
finds the headers of kernels/ (the folder is an include path of g++ and nvcc, as nvcc has it beside
the .cu file), and their text keys the build caches. `#include <cuda_fp16.h>` and `<cuda_bf16.h>` find
this folder's emulations of CUDA's 16-bit float types, and `<mma.h>` its emulation of the warp matrix
functions (nvcuda::wmma, m16n16k16; nvcc and NVRTC use CUDA's own headers).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import operator
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

RUNTIME = Path(__file__).parent
RUNTIME_FILES = ("emulator.h", "runtime.h", "launch.h", "fiber.h", "cuda_fp16.h", "cuda_bf16.h",
                 "mma.h")  # (keys the cache)
KERNEL_HEADERS = RUNTIME.parents[1] / "kernels"  # gpunet's kernels and their shared headers (*.cuh)
KINDS = ("pointer", "int", "uint", "float", "bool")  # the order of emu::Kind in emulator.h

LIMITS = dict(max_threads_per_block=1024, max_block=(1024, 1024, 64), max_grid=(2**31 - 1, 65535, 65535),
              max_shared_bytes=48 * 1024, max_registers_per_block=65536)


@dataclass(frozen=True)
class Param:
    """One kernel parameter as the compiled kernel sees it."""
    size: int  # sizeof the C++ parameter type
    kind: str  # one of KINDS


@dataclass(frozen=True)
class KernelInfo:
    name: str
    params: tuple[Param, ...]


class LaunchError(ValueError):
    """A launch a real GPU would refuse (the message names the kernel and the limit)."""


class KernelFault(RuntimeError):
    """The kernel misbehaved while running (a divergent barrier, a shuffle with a missing lane...)."""


_built: dict[tuple, "EmulatedModule"] = {}  # (source, tsan, defines, *headers' texts) -> module
_launch_lock = threading.Lock()  # the runtime's state and its signal handlers are per process
_tsan_fibers = (ctypes.c_void_p * 2048)()  # TSan contexts, shared by every tsan=True module (runtime.h)


def build(source: str, *, name: str = "module", tsan: bool = False, defines=()) -> "EmulatedModule":
    """The kernels of `source` (a .cu text, unchanged), compiled for the CPU with the -DNAME=value
    flags `defines`; cached in this process and on disk (by a hash of the source, the runtime and
    the flags)."""
    defines = _define_flags(defines)
    key = (source, tsan, defines, *_header_texts())
    if key not in _built:
        compiler = shutil.which("g++")
        if compiler is None:
            raise RuntimeError("g++ is not on this machine: CUDA kernels cannot be emulated on the CPU")
        if tsan and not tsan_loaded():
            raise RuntimeError("a tsan=True module needs the ThreadSanitizer runtime loaded first: run Python with "
                               "tsan_environment() (LD_PRELOAD of libtsan)")
        resources = _nvcc_resources(source, name, defines)  # started first: nvcc runs while g++ does
        try:
            library = ctypes.CDLL(str(_compile(compiler, source, kernel_names(source), name, tsan, defines)))
        except BaseException:
            resources(check=False)  # the g++ error is the one to see
            raise
        _built[key] = EmulatedModule(library, name, resources())
    return _built[key]


def _define_flags(defines) -> tuple[str, ...]:
    flags = tuple(defines)
    for flag in flags:
        if not re.fullmatch(r"-D[A-Za-z_]\w*(=\S*)?", flag):
            raise ValueError(f"defines are -DNAME or -DNAME=value flags, got {flag!r}")
    return flags


def kernel_names(source: str) -> list[str]:
    """The `extern "C" __global__ void NAME(` kernels of a source, comments ignored."""
    code = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source, flags=re.S)
    pattern = r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\('
    return list(dict.fromkeys(re.findall(pattern, code)))


def cache_dir() -> Path:
    return Path(os.environ.get("GPUNET_EMULATOR_CACHE") or Path.home() / ".cache" / "gpunet" / "emulator")


def _flags(tsan: bool) -> list[str]:
    # -fstack-clash-protection: a big stack frame touches each page, so overflowing a fiber's stack
    # hits its guard page (reported) instead of the next fiber's stack.
    common = ["-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fstack-clash-protection", "-w",
              "-U_FORTIFY_SOURCE", "-I", str(RUNTIME), "-I", str(KERNEL_HEADERS)]
    if tsan:
        return common + ["-DEMU_TSAN=1", "-fsanitize=thread", "-g", "-O1", "-pthread"]
    return common + ["-DEMU_TSAN=0", "-O1"]


def _translation_unit(source: str, names: list[str], name: str) -> str:
    entries = "".join(f"    EMU_KERNEL({k}),\n" for k in names)
    return (f'#include "emulator.h"\n#line 1 "{name}.cu"\n{source}\n#line 1 "{name} registry"\n'
            f"extern const emu::KernelEntry emu_registry[] = {{\n{entries}    {{nullptr, 0, nullptr, nullptr, nullptr}}}};\n"
            f"extern const int emu_registry_size = {len(names)};\n")


def _header_texts() -> list[str]:
    """The kernels' headers a source may include: part of each cache key, so a changed header rebuilds."""
    return [f"{path.name}\n{path.read_text()}" for path in sorted(KERNEL_HEADERS.glob("*.cuh"))]


def _tool_environment() -> dict[str, str]:
    """The tools run without a preloaded TSan runtime (nvcc crashes under it)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


@functools.cache
def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, env=_tool_environment()).stdout


def _compile(compiler: str, source: str, names: list[str], name: str, tsan: bool, defines: tuple[str, ...]) -> Path:
    unit = _translation_unit(source, names, re.sub(r"\W", "_", name))
    flags = _flags(tsan) + list(defines)
    digest = hashlib.sha256("\0".join([unit, *flags, _compiler_version(compiler), *_header_texts(),
                                       *((RUNTIME / f).read_text() for f in RUNTIME_FILES)]).encode()).hexdigest()
    folder, stem = cache_dir(), re.sub(r"[^\w.-]", "_", name)
    target = folder / f"{stem}-{'tsan-' if tsan else ''}{digest[:20]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:  # then moved into place: atomic
        unit_path, built = Path(scratch) / f"{target.stem}.cpp", Path(scratch) / target.name
        unit_path.write_text(unit)
        result = subprocess.run([compiler, *flags, str(unit_path), "-o", str(built)], capture_output=True, text=True,
                                env=_tool_environment())
        if result.returncode != 0:
            raise RuntimeError(f"g++ could not compile {name} for the emulator:\n{result.stderr[-6000:]}")
        os.replace(built, target)
    return target


def _nvcc_resources(source: str, name: str, defines: tuple[str, ...] = ()):
    """Starts `nvcc --resource-usage -arch=sm_90` on the source; returns a function that waits
    for it and gives {kernel: (registers per thread, static shared bytes)}, or None without nvcc."""
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
    if nvcc is None:
        return lambda check=True: None
    digest = hashlib.sha256("\0".join([source, *defines, _compiler_version(nvcc), *_header_texts()]).encode()
                            ).hexdigest()[:20]
    cached = cache_dir() / f"resources-{digest}.txt"
    if cached.exists():
        return lambda check=True: parse_resource_usage(cached.read_text())
    scratch = tempfile.TemporaryDirectory()
    path = Path(scratch.name) / "source.cu"
    path.write_text(source)
    process = subprocess.Popen([nvcc, "--resource-usage", "-arch=sm_90", "-I", str(KERNEL_HEADERS), *defines, "-c",
                                str(path), "-o", os.devnull],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=scratch.name,
                               env=_tool_environment())

    def finish(check=True):
        output = process.communicate()[0]
        scratch.cleanup()
        if process.returncode != 0:
            if not check:
                return None
            raise RuntimeError(f"nvcc could not compile {name} (for its resource usage):\n{output[-6000:]}")
        cache_dir().mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(output)
        os.replace(temporary, cached)
        return parse_resource_usage(output)

    return finish


def parse_resource_usage(output: str) -> dict[str, tuple[int, int]]:
    """ptxas' "Compiling entry function 'NAME'" ... "Used R registers, ... S bytes smem" lines."""
    usage, current = {}, None
    for line in output.splitlines():
        if entry := re.search(r"Compiling entry function '(\w+)'", line):
            current = entry.group(1)
        elif current and (used := re.search(r"Used (\d+) registers", line)):
            shared = re.search(r"(\d+) bytes smem", line)
            usage[current] = (int(used.group(1)), int(shared.group(1)) if shared else 0)
            current = None
    return usage


def tsan_runtime() -> str | None:
    """libtsan's path (from g++), or None."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    path = subprocess.run([compiler, "-print-file-name=libtsan.so"], capture_output=True, text=True,
                          env=_tool_environment()).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def tsan_loaded() -> bool:
    return hasattr(ctypes.CDLL(None), "__tsan_init")


def tsan_environment() -> dict[str, str]:
    """The environment for a Python subprocess (sys.executable: not a shell shim, which TSan
    crashes) that may load tsan=True modules; a race makes it exit with status 66. The
    suppressions (tests/cuda/tsan.supp) drop only glibc's hand-over of a dead thread's TLS."""
    return dict(os.environ, LD_PRELOAD=tsan_runtime() or "", TSAN_OPTIONS="halt_on_error=1:exitcode=66:"
                f"report_signal_unsafe=0:suppressions={RUNTIME / 'tsan.supp'}")


class EmulatedModule:
    def __init__(self, library: ctypes.CDLL, name: str, resources: dict[str, tuple[int, int]] | None):
        self.name, self._lib, self._launches = name, library, 0
        library.emu_kernel_name.restype = ctypes.c_char_p
        library.emu_launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                       ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_char_p,
                                       ctypes.c_int]
        self.kernels: dict[str, KernelInfo] = {}
        self._index: dict[str, int] = {}
        for k in range(library.emu_kernel_count()):
            kernel = library.emu_kernel_name(k).decode()
            params = tuple(Param(library.emu_param_size(k, i), KINDS[library.emu_param_kind(k, i)])
                           for i in range(library.emu_param_count(k)))
            self.kernels[kernel], self._index[kernel] = KernelInfo(kernel, params), k
        self.resources = resources

    def launch(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int],
               args: list[int | bytes], shared_mem: int = 0) -> None:
        """Runs kernel `name` synchronously. args[i]: an int address for a pointer parameter, else
        exactly params[i].size raw bytes."""
        if name not in self.kernels:
            raise KeyError(f"module {self.name} has no kernel {name!r} (it has {', '.join(self.kernels)})")
        raw = self._marshal(self.kernels[name], args)
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        self._check_limits(name, grid, block, shared_mem)
        blob = ctypes.create_string_buffer(b"".join(raw) or b"\0")
        offsets = [sum(map(len, raw[:i])) for i in range(len(raw))]
        pointers = (ctypes.c_void_p * max(1, len(raw)))(*(ctypes.addressof(blob) + o for o in offsets))
        message = ctypes.create_string_buffer(2048)
        with _launch_lock:
            self._launches += 1  # the seed: a fresh but reproducible block and warp order per launch
            failed = self._lib.emu_launch(self._index[name], (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                                          pointers, self._launches, _tsan_fibers, message, len(message))
        if failed:
            raise KernelFault(f"{message.value.decode(errors='replace')} (module {self.name}, launch {self._launches})")

    @staticmethod
    def _marshal(info: KernelInfo, args) -> list[bytes]:
        if len(args) != len(info.params):
            raise TypeError(f"kernel {info.name} takes {len(info.params)} arguments, got {len(args)}")
        raw = []
        for i, (param, arg) in enumerate(zip(info.params, args)):
            where = f"kernel {info.name}, parameter {i}"
            if param.kind == "pointer":
                if isinstance(arg, bool) or not isinstance(arg, int):
                    raise TypeError(f"{where} is a pointer: expected an int address, got {type(arg).__name__}")
                if not 0 <= arg < 2**64:
                    raise TypeError(f"{where} is a pointer: {arg} is not an address")
                raw.append(arg.to_bytes(8, "little"))
            elif not isinstance(arg, (bytes, bytearray)):
                raise TypeError(f"{where} is a {param.size}-byte {param.kind}: expected {param.size} raw bytes, "
                                f"got {type(arg).__name__} (an address where a scalar goes?)")
            elif len(arg) != param.size:
                raise TypeError(f"{where} is a {param.size}-byte {param.kind}: expected {param.size} bytes, "
                                f"got {len(arg)}")
            else:
                raw.append(bytes(arg))
        return raw

    def _check_limits(self, name: str, grid, block, shared_mem: int) -> None:
        def refuse(what):
            raise LaunchError(f"kernel {name}: {what}")

        if min(grid) < 1 or min(block) < 1:
            refuse(f"grid {grid} and block {block} must have every dimension >= 1 (a launch with no blocks or "
                   f"threads is refused)")
        for axis, (value, limit) in enumerate(zip(block, LIMITS["max_block"])):
            if value > limit:
                refuse(f"blockDim.{'xyz'[axis]} = {value} is over the limit {limit}")
        threads = math.prod(block)
        if threads > LIMITS["max_threads_per_block"]:
            refuse(f"{threads} threads per block is over the limit {LIMITS['max_threads_per_block']}")
        for axis, (value, limit) in enumerate(zip(grid, LIMITS["max_grid"])):
            if value > limit:
                refuse(f"gridDim.{'xyz'[axis]} = {value} is over the limit {limit}")
        registers, static_shared = (self.resources or {}).get(name, (None, 0))
        if shared_mem < 0 or shared_mem + static_shared > LIMITS["max_shared_bytes"]:
            refuse(f"{shared_mem} bytes of dynamic + {static_shared} of static shared memory is over the limit "
                   f"{LIMITS['max_shared_bytes']}")
        if registers is not None and registers * threads > LIMITS["max_registers_per_block"]:
            refuse(f"{registers} registers x {threads} threads is over the limit of "
                   f"{LIMITS['max_registers_per_block']} registers per block")


def _dims(value, what: str) -> tuple[int, int, int]:
    """An int or a tuple of up to 3 ints (NumPy's too), as (x, y, z)."""
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(dims) <= 3 or any(isinstance(d, bool) or not hasattr(d, "__index__") for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of up to 3 ints, got {value!r}")
    return tuple(operator.index(d) for d in dims) + (1,) * (3 - len(dims))


if __name__ == "__main__":  # python -m tests.cuda.emulator FILE.cu [-DNAME=value ...]: kernels and resources
    module = build(Path(sys.argv[1]).read_text(), name=Path(sys.argv[1]).stem, defines=sys.argv[2:])
    for kernel, info in module.kernels.items():
        print(kernel, [f"{p.kind}{p.size * 8}" for p in info.params], (module.resources or {}).get(kernel))
