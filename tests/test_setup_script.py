"""scripts/setup.sh and scripts/run: the README's two commands on any Python set-up, never
installing into an "externally managed" (PEP 668) or read-only interpreter."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _externally_managed(python: Path) -> bool:
    if not python.exists():
        return False
    stdlib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True).stdout.strip()
    return (Path(stdlib) / "EXTERNALLY-MANAGED").exists()


def _copy_scripts(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    return tmp_path


def _fake_venv(project: Path) -> None:
    """A .venv whose python3 says it is the venv's (what scripts/run finds; nothing is installed)."""
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\necho project-venv \"$VIRTUAL_ENV\"\n")
        (bin_dir / name).chmod(0o755)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    return {**env, **extra}


def test_run_passes_through_without_a_project_venv(tmp_path):
    project = _copy_scripts(tmp_path)
    out = subprocess.run(["scripts/run", sys.executable, "-c", "import sys; print(sys.prefix)"], cwd=project,
                         env=_clean_env(), capture_output=True, text=True, check=True).stdout
    assert out.strip() == sys.prefix


def test_run_uses_the_project_venv_unless_an_environment_is_active(tmp_path):
    project = _copy_scripts(tmp_path)
    _fake_venv(project)
    out = subprocess.run(["scripts/run", "python3"], cwd=project, env=_clean_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["project-venv", str(project / ".venv")]
    active = _clean_env(VIRTUAL_ENV=sys.prefix)  # the user's own environment wins over .venv
    out = subprocess.run(["scripts/run", sys.executable, "-c", "import sys; print(sys.prefix)"], cwd=project,
                         env=active, capture_output=True, text=True, check=True).stdout
    assert out.strip() == sys.prefix


def test_setup_refuses_an_active_environment_that_refuses_installs(tmp_path):
    if not _externally_managed(SYSTEM_PYTHON):
        pytest.skip(f"no externally managed {SYSTEM_PYTHON} on this machine")
    project = _copy_scripts(tmp_path)
    result = subprocess.run(["bash", "scripts/setup.sh"], cwd=project, capture_output=True, text=True,
                            env=_clean_env(VIRTUAL_ENV="/nonexistent", PYTHON=str(SYSTEM_PYTHON)))
    assert result.returncode == 1 and not (project / ".venv").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(f"setup: {SYSTEM_PYTHON} in the active environment")


@pytest.mark.slow
def test_setup_makes_a_project_venv_for_an_externally_managed_python(tmp_path):
    """Debian's own python3 (PEP 668 marker present): setup creates .venv, installs gpunet there,
    and leaves the system interpreter as it was; a second run reuses the venv. Dependencies are
    skipped (PIP_NO_DEPS) to keep this fast: the full commands were run by hand (see docs/install.md)."""
    if not _externally_managed(SYSTEM_PYTHON):
        pytest.skip(f"no externally managed {SYSTEM_PYTHON} on this machine")
    project = tmp_path / "gpunet"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    for name in ("src", "kernels", "scripts"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = _clean_env(PATH=f"{SYSTEM_PYTHON.parent}:/bin", PIP_NO_DEPS="1", PYTHON="python3")
    before = subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "list"], capture_output=True, text=True).stdout
    first = subprocess.run(["bash", "scripts/setup.sh"], cwd=project, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr
    assert "creating the project environment .venv" in first.stderr
    prefix = subprocess.run(["scripts/run", "python3", "-c", "import sys, gpunet; print(sys.prefix, gpunet.__file__)"],
                            cwd=project, env=env, capture_output=True, text=True)
    # gpunet imports numpy, which PIP_NO_DEPS left out: the venv's python and its gpunet are found first
    assert "No module named 'numpy'" in prefix.stderr and str(project / "src" / "gpunet") in prefix.stderr
    shown = subprocess.run(["scripts/run", "python3", "-m", "pip", "show", "gpunet"], cwd=project, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert "Name: gpunet" in shown
    second = subprocess.run(["bash", "scripts/setup.sh"], cwd=project, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0 and "creating" not in second.stderr
    assert "setup: .venv/bin/python -m pip install" in second.stderr
    after = subprocess.run([str(SYSTEM_PYTHON), "-m", "pip", "list"], capture_output=True, text=True).stdout
    assert after == before and f"Location: {project / '.venv'}" in shown
