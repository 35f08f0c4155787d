"""The real-CuPy tier: what the real cupy-cuda13x wheel (no [ctk]; NVRTC from the test extra's
wheel) shows about gpunet on a machine without a GPU. Collected only where that wheel is
installed (conftest.py): bash scripts/real_cupy_tier.sh runs it in .venv-realcupy.

Every check runs in a fresh interpreter (this process has the suite's CuPy stand-in in
sys.modules), with its own CUPY_CACHE_DIR so nothing is written under ~/.cupy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpunet.backend import cuda_kernels
from tests.real_cupy import summary
from tests.support.reliability import snapshot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARCHS = ("80", "90", "100")
FALLBACK = "gpunet: no usable GPU, running on the CPU: CuPy is installed but "  # the real CuPy, not "not installed"


def run(args, cwd, cache, timeout=600):
    """sys.executable ARGS in cwd, CuPy's kernel cache in `cache` (made by pytest, not under ~/.cupy)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUNET_DEVICE", "CUPY_CACHE_DIR")}
    env["CUPY_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def probe(script, *args, cache):
    done = run([HERE / script, *args], ROOT, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cupy-cache")


@pytest.fixture(scope="module")
def api(cache):
    return probe("probe_api.py", cache=cache)


@pytest.fixture(scope="module")
def kernels(cache):
    return probe("probe_kernels.py", *ARCHS, cache=cache)


def test_the_real_cupy_14_is_the_one_checked(api):
    assert api["cupy"].startswith("14."), api["cupy"]
    assert "gpu_standin" not in api["cupy_file"] and Path(api["cupy_file"]).parts[-3] == "site-packages"


def test_every_api_gpunet_reaches_exists_with_a_compatible_signature(api):
    assert api["references"] > 50 and set(api["roots"]) == {"cupy", "cupyx", "nvmath", "xp"}, api["by_root"]
    wrong = [f"{r['where']}: {r['api']} {r['status']}: {r['detail']}" for r in api["results"]
             if r["status"] not in ("ok", "unverifiable", "not_followed")]
    assert not wrong, "\n".join(wrong)
    unverifiable = sorted({r["api"] for r in api["results"] if r["status"] == "unverifiable"})
    assert len(unverifiable) <= 3, unverifiable  # a CuPy change that hides more signatures should be looked at
    counts = api["by_status"]
    summary.LINES.append(
        f"APIs: {api['references']} references in src/gpunet ({', '.join(f'{k} {v}' for k, v in api['by_root'].items())}); "
        f"{counts.get('ok', 0)} checks passed ({api['distinct_checked']} distinct APIs and call shapes; signatures from "
        f"inspect {api['signature_sources']['inspect']}, from docstrings {api['signature_sources']['docstring']}), "
        f"{counts.get('unverifiable', 0)} unverifiable ({', '.join(unverifiable) or 'none'}), "
        f"{counts.get('not_followed', 0)} past a result of unknown type, CuPy {api['cupy']}, NumPy {api['numpy']}")


SYNTHETIC = '''
import cupy


def f(xp, a, b, m, name):
    cupy.zeros(3, dtype="float32")
    cupy.not_an_api
    cupy.add(a, b, where=m)
    cupy.zeros(1, 2, 3, 4, 5)
    xp.cuda.Stream()
    getattr(cupy, name)
    cupy.cuda.Device().not_a_method()
'''


def test_the_api_probe_reports_what_is_wrong(tmp_path, cache):
    source = tmp_path / "synthetic.py"
    source.write_text(SYNTHETIC)
    results = {(r["api"], r["status"]) for r in probe("probe_api.py", "--source", source, cache=cache)["results"]}
    assert results == {("cupy", "ok"), ("cupy.zeros", "ok"),
                       ("cupy.not_an_api", "missing"),
                       ("cupy.add", "incompatible"),  # CuPy's ufuncs take no where=
                       ("cupy.zeros", "incompatible"),  # five positional arguments
                       ("numpy.cuda.Stream", "missing"), ("cupy.cuda.Stream", "ok"),  # xp: both must have it
                       ("cupy.*", "missing"),  # a computed name the allow-list does not list
                       ("cupy.cuda.Device", "ok"), ("cupy.cuda.Device.().not_a_method", "missing")}


def test_every_kernel_compiles_with_gpunets_options_for_each_architecture(kernels):
    families = sorted(p.stem for p in (ROOT / "kernels").glob("*.cu"))
    assert kernels["families"] == families and len(families) >= 8
    assert kernels["cupy"].startswith("14.") and kernels["options"] == list(cuda_kernels.NVRTC_OPTIONS)
    for arch in ARCHS:
        result = kernels["archs"][arch]
        assert result["failures"] == {}, result["failures"]
        assert [c["family"] for c in result["compiled"]] == families
        for compiled in result["compiled"]:
            assert compiled["options"] == list(cuda_kernels.NVRTC_OPTIONS), compiled  # what gpunet handed RawModule
    per_arch = ", ".join(f"sm_{a} {len(kernels['archs'][a]['compiled'])}/{len(families)} files "
                         f"({sum(c['kernels'] for c in kernels['archs'][a]['compiled'])} kernels)" for a in ARCHS)
    warned = sorted({f for a in ARCHS for f in kernels["archs"][a]["warnings"]})
    summary.LINES.append(f"kernels: compiled through CuPy {kernels['cupy']}'s NVRTC path (NVRTC {kernels['nvrtc']}) "
                         f"with gpunet's options: {per_arch}; NVRTC warnings in: {', '.join(warned) or 'none'}")


def test_the_kernel_probe_reports_a_source_that_does_not_compile(cache):
    script = ("from tests.real_cupy import probe_kernels as p\n"
              "made = []\n"
              "p.arch_pinned_raw_module('80', made)(code='extern \"C\" __global__ void k(float* x) { x[0] = y; }',"
              " options=('--std=c++17',)).compile()\n")
    done = run(["-c", script], ROOT, cache)
    assert done.returncode == 1 and "CompileException" in done.stderr and "identifier \"y\" is undefined" in done.stderr


def test_gpunet_imports_and_auto_falls_back_to_the_cpu_in_one_line(tmp_path, cache):
    done = run(["-c", "import cupy, gpunet as gn; print(gn.device('auto').name, cupy.__version__, cupy.__file__)"],
               tmp_path, cache)
    assert done.returncode == 0, done.stderr
    name, version, path = done.stdout.split()
    assert name == "cpu" and version.startswith("14.") and "gpu_standin" not in path
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(FALLBACK), done.stderr


def test_gpunet_info_reports_the_real_versions(tmp_path, cache):
    versions = run(["-c", "import cupy, nvmath; print(cupy.__version__, nvmath.__version__)"], tmp_path, cache)
    cupy_version, nvmath_version = versions.stdout.split()
    done = run(["-m", "gpunet", "info"], tmp_path, cache)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"CuPy: {cupy_version}" in lines and f"nvmath: {nvmath_version}" in " ".join(lines)
    assert any(line.startswith("CUDA runtime: 13.") for line in lines), lines
    assert "GPU usable: no (CuPy is installed but " in done.stdout and "auto picks: cpu" in lines
    summary.LINES.append(f"gpunet info: {' | '.join(lines[1:5])}")


def test_training_on_the_gpu_is_refused_in_one_line_and_nothing_is_written(tmp_path, cache):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    done = run(["-m", "gpunet", "train", "--device", "gpu", "--steps", "1", "--out", tmp_path / "run"], tmp_path, cache)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(
        "gpunet train: device 'gpu' was requested but no GPU is usable: CuPy is installed but "), done.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_training_with_auto_runs_on_the_cpu_after_one_line(tmp_path, cache):
    done = run(["-m", "gpunet", "train", "--steps", "2", "--batch-size", "16", "--no-progress", "--out",
                tmp_path / "run"], tmp_path, cache)
    assert done.returncode == 0, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(FALLBACK), done.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file() and "final: step 2" in done.stdout
