"""What a GPU session needs, in a few lines, before any stage spends device time.

Usage (what scripts/gpu_session.sh runs first):  PYTHONPATH=src python3 scripts/gpu_preflight.py
Prints one line per part: the GPU and its driver, CUDA, CuPy and the toolkit libraries it loads
(NVRTC, cuBLAS, NCCL), compute-sanitizer, and every Python package gpunet and the session's
stages import. Exits 0 when everything required is there; else prints, for each missing part,
the offline step that adds it (the GPU machine reaches no package registry: a wheel is
downloaded elsewhere and carried over), and exits 2. NCCL and compute-sanitizer are reported
but not required: one GPU needs no NCCL, and the session's sanitizer stage says itself when
compute-sanitizer is absent.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys

# (import name, distribution, why the session needs it): gpunet's dependencies, then the stages'
PACKAGES = [("numpy", "numpy", "gpunet"), ("numba", "numba", "gpunet (CPU kernels)"),
            ("safetensors", "safetensors", "gpunet (checkpoints)"), ("tqdm", "tqdm", "gpunet (progress bar)"),
            ("pytest", "pytest", "the gpu tests"), ("torch", "torch", "gpunet parity and bench")]
# What else gpunet imports, only for optional parts: reported on one line, never required
OPTIONAL = [("nvmath", "nvmath-python"), ("mpi4py", "mpi4py"), ("matplotlib", "matplotlib"),
            ("threadpoolctl", "threadpoolctl"), ("optuna", "optuna")]
# The minimum driver of each CuPy wheel (NVIDIA's CUDA minor-version compatibility: a CUDA 12.x
# runtime needs driver >= 525.60.13, a 13.x runtime driver >= 580); see docs/install.md.
WHEEL_DRIVER = {"cupy-cuda12x": ((525, 60, 13), 12), "cupy-cuda13x": ((580,), 13)}
# CUDA 13's toolkit wheels dropped the -cuNN suffix of CUDA 12's
TOOLKIT_WHEEL = {12: "nvidia-{}-cu12", 13: "nvidia-{}"}


def carry(wheel: str, deps: bool = False) -> str:
    """The offline step that adds a wheel (with its dependencies' wheels when deps) to a machine
    without a package registry."""
    return (f"carry the wheel{'s' if deps else ''}: elsewhere `pip download {'' if deps else '--no-deps '}"
            f"--only-binary=:all: --python-version "
            f"{sys.version_info.major}.{sys.version_info.minor} --platform manylinux_2_28_x86_64 -d wheels '{wheel}'`, "
            f"then on the GPU machine `pip install --no-index --find-links wheels '{wheel}'`")


class Report:
    def __init__(self):
        self.missing: list[tuple[str, str]] = []  # (what, the step that adds it)

    def line(self, name: str, value: str) -> None:
        print(f"{name:<17} {value}", flush=True)

    def need(self, name: str, what: str, step: str) -> None:
        self.line(name, f"MISSING: {what}")
        self.missing.append((f"{name}: {what}", step))


def _run(command: list[str], timeout: float = 20.0) -> str | None:
    """The command's first output line, or None when it is not on PATH, fails or hangs."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def check_gpu(report: Report) -> tuple[int, ...] | None:
    """The GPU and driver as nvidia-smi reports them; the driver's version, or None."""
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi is None:
        report.need("GPU", "no NVIDIA GPU is visible (nvidia-smi is not on PATH or fails)",
                    "run on the machine with the GPU; its NVIDIA driver cannot be carried as a wheel")
        return None
    name, driver, memory = (part.strip() for part in (smi.split(",") + ["?", "?"])[:3])
    report.line("GPU", f"{name} ({memory}), driver {driver}")
    return _version(driver)


def check_packages(report: Report) -> None:
    for module, dist, why in PACKAGES:
        try:
            importlib.import_module(module)
            version = importlib.metadata.version(dist)
        except Exception as exc:  # noqa: BLE001 - missing or broken: either way the stage cannot run
            report.need(module, f"cannot be imported ({type(exc).__name__}: {exc}); needed by {why}", carry(dist))
            continue
        report.line(module, version)
    found = []
    for module, dist in OPTIONAL:
        try:
            importlib.import_module(module)
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except Exception:  # noqa: BLE001 - optional: absent or broken, the part it serves is skipped
            found.append(f"{dist} absent")
    report.line("optional", ", ".join(found))


def check_cupy(report: Report, driver: tuple[int, ...] | None):
    """CuPy, its wheel against the driver, and whether a kernel runs; the cupy module or None."""
    wheels = [w for w in WHEEL_DRIVER if _installed(w)]
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        report.need("CuPy", f"cannot be imported ({type(exc).__name__}: {exc})",
                    carry("cupy-cuda13x[ctk]>=14", deps=True)
                    + " (cupy-cuda12x[ctk] where the driver is older than 580)")
        return None
    wheel = wheels[0] if wheels else "not a cupy-cudaNNx wheel"
    report.line("CuPy", f"{cupy.__version__} ({wheel})")
    if _version(cupy.__version__)[:1] < (14,):
        report.need("CuPy", f"{cupy.__version__} is older than 14, which gpunet requires",
                    carry("cupy-cuda13x[ctk]>=14", deps=True))
    if wheels and driver:
        least, major = WHEEL_DRIVER[wheels[0]]
        if driver < least:
            other = "cupy-cuda12x[ctk]>=14" if major == 13 else "a newer NVIDIA driver"
            report.need("CuPy", f"{wheels[0]} needs driver >= {'.'.join(map(str, least))}, this one is "
                        f"{'.'.join(map(str, driver))}", carry(other, deps=True) if major == 13 else "install " + other)
    if driver is None:  # no GPU: nothing more to ask CuPy
        return None
    try:
        runtime, supported = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        report.line("CUDA", f"runtime {_cuda(runtime)}, the driver supports up to {_cuda(supported)}")
    except Exception as exc:  # noqa: BLE001
        report.need("CUDA", f"the runtime or driver cannot be asked ({type(exc).__name__}: {exc})",
                    "check the driver with nvidia-smi; CuPy's wheel must match it (docs/install.md)")
        return None
    from gpunet.backend import devices

    usable, why = devices.gpu_status()
    if not usable:
        report.need("kernel", why, "see the reason; docs/install.md says which CuPy wheel goes with which driver")
        return None
    return cupy


def check_libraries(report: Report, cupy) -> None:
    """NVRTC and cuBLAS (required: every kernel compiles with NVRTC, every product is cuBLAS'),
    then NCCL (reported only)."""
    major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    toolkit = TOOLKIT_WHEEL.get(major, "nvidia-{}")
    try:
        module = cupy.RawModule(code='extern "C" __global__ void k(float* x) { x[0] = 1.0f; }')
        module.get_function("k")
        report.line("NVRTC", ".".join(map(str, cupy.cuda.nvrtc.getVersion())) + " (a kernel compiled)")
    except Exception as exc:  # noqa: BLE001
        report.need("NVRTC", f"cannot compile ({type(exc).__name__}: {exc})", carry(toolkit.format("cuda-nvrtc")))
    try:
        a = cupy.ones((64, 64), dtype=cupy.float32)
        total = float((a @ a).sum())
        version = cupy.cuda.cublas.getVersion(cupy.cuda.device.get_cublas_handle())
        if total != 64.0 ** 3:
            raise RuntimeError(f"a 64x64 product of ones summed to {total}, not {64.0 ** 3}")
        report.line("cuBLAS", f"{version} (a product checked)")
    except Exception as exc:  # noqa: BLE001
        report.need("cuBLAS", f"unusable ({type(exc).__name__}: {exc})", carry(toolkit.format("cublas")))
    try:
        from cupy.cuda import nccl

        state = f"{nccl.get_version()}" if nccl.available else "not available"
    except Exception as exc:  # noqa: BLE001
        state = f"not available ({type(exc).__name__})"
    if not state[0].isdigit():
        state += (f"; multi-GPU training falls back to MPI host copies (torchrun refuses); to add it "
                  f"{carry(f'nvidia-nccl-cu{major}>=2.16,<3')}")
    report.line("NCCL", state)


def check_sanitizer(report: Report) -> None:
    version = _run(["compute-sanitizer", "--version"])
    report.line("compute-sanitizer", version or "not on PATH: the session's sanitizer stage will say so and "
                "not run (it ships with the CUDA toolkit, not as a wheel)")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def main() -> int:
    report = Report()
    report.line("Python", sys.version.split()[0])
    driver = check_gpu(report)
    check_packages(report)
    cupy = check_cupy(report, driver)
    if cupy is not None:
        check_libraries(report, cupy)
    check_sanitizer(report)
    if not report.missing:
        print("preflight: ready", flush=True)
        return 0
    for what, step in report.missing:
        print(f"preflight: STOP: {what}; {step}", flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
