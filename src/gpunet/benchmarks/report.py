"""Reports of `gpunet bench`: the printed table, JSON, Markdown and a PNG of the ratios.

JSON fields: "date", "device", "machine", "versions", "command", "precision" (--precision: the model
rows'), "tiny", "results" (one object per benchmark: name, group, gpunet_s, torch_s, ratio, gpunet_spread,
torch_spread, rate, unit, roofline_rate, percent_of_roofline, samples_per_s, extra, precision: the row's
own, fp32 for kernel and dispatch rows) and "skipped" ([name, reason] pairs).
The roofline of a GEMM row is the plain BLAS (cuBLAS) GEMM of the same size; extra holds
percent_of_blas_peak, against the fastest BLAS GEMM of the run, and torch_samples_per_s.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys

import numpy

from gpunet.backend.devices import gpu_name
from gpunet.files import atomic_write

COLUMNS = ("benchmark", "gpunet", "PyTorch", "ratio", "spread", "rate", "% of roofline")


def environment(device: str, precision: str = "fp32") -> dict:
    import torch

    import gpunet

    versions = {"gpunet": gpunet.__version__, "python": platform.python_version(), "numpy": numpy.__version__,
                "torch": torch.__version__}
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), **_gpunet_threads()}
    if device == "gpu":
        import cupy

        versions["cupy"] = cupy.__version__
        machine["gpu"] = gpu_name(0)
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device, "machine": machine,
            "versions": versions, "command": " ".join(["gpunet", *sys.argv[1:]]) if sys.argv else "gpunet bench",
            "precision": precision}


def rows(results) -> list[tuple]:
    out = []
    for r in results:
        rate = f"{r.rate:.1f} {r.unit}" if r.rate is not None else (
            f"{r.samples_per_s:,.0f} samples/s" if r.samples_per_s else "")
        roof = f"{r.percent_of_roofline:.0f}%" if r.percent_of_roofline is not None else ""
        out.append((r.name, format_time(r.gpunet_s), format_time(r.torch_s), f"{r.ratio:.2f}",
                    f"{100 * max(r.gpunet_spread, r.torch_spread):.0f}%", rate, roof))
    return out


# Said under every table of a --tiny run: one call a round at toy sizes times mostly Python overhead
# and the clock, so its ratios (0.02 or 50) and spreads (thousands of percent) mean nothing.
TINY_NOTE = ("tiny sizes, one call a round: a smoke test of the harness, not a measurement; its ratios and "
             "spreads say nothing about speed (run without --tiny to measure)")


def table(results, skipped, tiny: bool = False) -> str:
    body = [COLUMNS, *rows(results)]
    widths = [max(len(row[i]) for row in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in body]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("ratio = gpunet time / PyTorch time (below 1: gpunet is faster); spread = p10-p90 of the rounds "
                 "over the median, the larger of the two sides")
    note = precision_note(results)
    if note:
        lines.append(note)
    if tiny:
        lines.append(TINY_NOTE)
    lines += [f"skipped {name}: {reason}" for name, reason in skipped]
    return "\n".join(lines)


def precision_note(results) -> str:
    """Said under a table with rows in mixed precision: which rows, and how each side ran them."""
    mixed = sorted({r.precision for r in results if r.precision != "fp32"})
    if not mixed:
        return ""
    p = mixed[0]
    return (f"precision {p}: the model and gemm16 rows (gpunet: precision.using('{p}'), as gn.fit; PyTorch: "
            f"torch.autocast{'; the models with a dynamic loss scale' if p == 'fp16' else ''}); the other kernel and "
            f"dispatch rows in fp32")


def markdown(results, skipped, env: dict, tiny: bool = False) -> str:
    head = (f"Measured {env['date']} on {env['device']} ({machine_name(env)}); versions "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; command `{env['command']}`.\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    note = precision_note(results)
    lines += [f"\n{note[0].upper()}{note[1:]}."] if note else []
    lines += [f"\n{TINY_NOTE[0].upper()}{TINY_NOTE[1:]}."] if tiny else []
    lines += [f"\nSkipped {name}: {reason}." for name, reason in skipped]
    return head + "\n".join(lines) + "\n"


def to_json(results, skipped, env: dict, tiny: bool) -> str:
    return json.dumps({**env, "tiny": tiny, "results": [dataclasses.asdict(r) for r in results],
                       "skipped": [list(s) for s in skipped]}, indent=2)


def plot(results, path, env: dict) -> None:
    # A Figure of its own on the Agg canvas: no pyplot, so the caller's backend and figures are untouched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.name for r in results]
    ratios = [r.ratio for r in results]
    fig = Figure(figsize=(8, 0.35 * len(names) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = ["tab:green" if x <= 1 else "tab:red" for x in ratios]
    ax.barh(names, ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("gpunet time / PyTorch time (below 1: gpunet faster)")
    ax.set_title(f"gpunet vs PyTorch on {env['device']} ({machine_name(env)})", fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpunet_threads() -> dict:
    """The CPU side's thread pools: OpenBLAS's (GEMMs; through threadpoolctl when installed, else
    its environment variable or None) and Numba's (the parallel kernels), which take turns with it."""
    import numba

    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    try:
        from threadpoolctl import threadpool_info

        blas = next((p["num_threads"] for p in threadpool_info() if p.get("internal_api") == "openblas"), blas)
    except ImportError:
        pass
    return {"blas_threads": None if blas is None else int(blas), "numba_threads": numba.get_num_threads()}


def machine_name(env) -> str:
    m = env["machine"]
    if m.get("gpu"):
        return m["gpu"]
    threads = (f"; threads: PyTorch {m['torch_threads']}, OpenBLAS {m.get('blas_threads') or '?'}, "
               f"Numba {m['numba_threads']}" if "numba_threads" in m else "")
    return f"{m['cpu']}, {m['cores']} cores{threads}"


def format_time(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"
