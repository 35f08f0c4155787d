"""A GPU check cannot pass on the stand-in (issue 27): under GPUNET_REQUIRE_GPU=1, which
scripts/gpu_session.sh sets, the stand-in refuses to load and every gpu test fails at once with the
reason the real GPU is unusable; the session's preflight stops naming what is missing.

Both run in subprocesses, as the session runs them. CUDA_VISIBLE_DEVICES="" hides any real GPU
from CuPy and a PATH without nvidia-smi hides it from the preflight, so the outcome is the same on
a machine with a GPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REASON = "GPUNET_REQUIRE_GPU=1 and the real GPU is unusable: "
GPU_FILES = ["tests/test_cuda_graph.py", "tests/backend/test_gemm_dispatch.py", "tests/distributed/test_nccl_glue.py"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GPUNET_REQUIRE"))}
    env.update(PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="", **extra)
    return env


def test_every_gpu_test_fails_fast_with_the_reason_when_a_real_gpu_is_required():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_FILES],
                          cwd=ROOT, env=_env(GPUNET_REQUIRE_GPU="1"), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-2000:]
    summary = out.strip().splitlines()[-1]
    failed = int(re.search(r"(\d+) failed", summary).group(1))
    assert failed >= 20 and not re.search(r"passed|skipped|error", summary), summary
    # each failure's section is the one reason line (no traceback: none of the test's code ran); the short
    # summary after the sections repeats it, cut to the terminal's width except under CI=true
    sections = out.split("short test summary info")[0]
    assert sections.count(REASON) == failed, out[-2000:]
    assert "Traceback" not in out
    assert seconds < 120, f"{failed} gpu tests took {seconds:.0f} s to fail"


def test_without_the_requirement_the_same_tests_run_on_the_stand_in():
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "tests/distributed/test_nccl_glue.py"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert re.search(r"\d+ passed", done.stdout) and REASON not in done.stdout


def test_the_preflight_lists_what_it_found_and_stops_naming_the_missing_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_preflight.py")], cwd=ROOT,
                          env=_env(PATH=str(tmp_path)), capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert lines[0] == f"Python            {sys.version.split()[0]}"
    assert lines[1] == "GPU               MISSING: no NVIDIA GPU is visible (nvidia-smi is not on PATH or fails)"
    import numpy

    assert f"numpy             {numpy.__version__}" in lines
    assert any(line.startswith("compute-sanitizer not on PATH") for line in lines)
    stops = [line for line in lines if line.startswith("preflight: STOP: ")]
    assert stops[0] == ("preflight: STOP: GPU: no NVIDIA GPU is visible (nvidia-smi is not on PATH or fails); run on "
                        "the machine with the GPU; its NVIDIA driver cannot be carried as a wheel")
    assert "preflight: ready" not in lines and done.stderr == ""


def test_the_session_script_stops_after_the_preflight_naming_what_is_missing(tmp_path):
    """scripts/gpu_session.sh spends no stage's time when the preflight stops: its summary says why."""
    import shutil

    tools = tmp_path / "bin"  # the tools the script calls, and no nvidia-smi or compute-sanitizer
    tools.mkdir()
    for tool in ("bash", "mkdir", "date", "timeout", "tee", "grep", "rm"):
        (tools / tool).symlink_to(shutil.which(tool))
    (tools / "python3").symlink_to(sys.executable)
    out = tmp_path / "results"
    started = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), str(out)], cwd=ROOT,
                          env=_env(PATH=str(tools)), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["preflight.txt", "summary.txt"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("gpu session ") and summary[1].startswith("preflight: exit 2, ")
    assert summary[2].startswith("preflight: STOP: GPU: no NVIDIA GPU is visible")
    assert "gpu tests" not in done.stdout and time.monotonic() - started < 60


def test_past_the_preflight_every_stage_runs_under_its_timeout_and_a_missing_sanitizer_is_said(tmp_path):
    """The stages after a preflight that passes (faked here: no GPU), with no compute-sanitizer on PATH:
    each stage's exit in the summary, the gpu tests failing under GPUNET_REQUIRE_GPU=1, the sanitizer
    stages replaced by one line (not exit 127), and the run within its budget."""
    import shutil

    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "mkdir", "date", "timeout", "tee", "grep", "rm"):
        (tools / tool).symlink_to(shutil.which(tool))
    (tools / "python3").write_text(f'#!{shutil.which("bash")}\n'
                                   '[ "$1" = scripts/gpu_preflight.py ] && { echo "preflight: ready"; exit 0; }\n'
                                   f'exec {sys.executable} "$@"\n')
    (tools / "python3").chmod(0o755)
    out = tmp_path / "results"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), str(out)], cwd=ROOT,
                          env=_env(PATH=str(tools)), capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    stages = [line.split(":")[0] for line in summary.splitlines()[1:]]
    assert stages == ["preflight", "gpu tests", "parity mlp", "parity cnn", "parity rnn", "parity transformer",
                      "compute-sanitizer", "bench", "bench bf16", "train cnn --cuda-graph", "train cnn --no-cuda-graph",
                      "total"]
    assert "gpu tests: exit 1, " in summary and "parity cnn: exit 1, " in summary  # no GPU: they fail, and say so
    assert ("compute-sanitizer: not on PATH, sanitizer stages not run (it ships with the CUDA toolkit: put its bin/ "
            "on PATH)") in summary and "exit 127" not in summary
    assert REASON in (out / "tests.txt").read_text()
    total = summary.splitlines()[-1]
    assert int(total.split()[1]) < 290 and total.endswith(" s, 9 stage(s) failed"), summary
    assert done.returncode == 1, done.stderr
