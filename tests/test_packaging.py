"""Packaging: the version in one place, the licence, the extras, the wheel's contents, the type
hints (mypy), the cache locations, the README's links and `gpunet info`'s optional parts."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import gpunet as gn
from gpunet import extras, paths

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_version_is_written_once_and_installed_metadata_agrees():
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gpunet.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", gn.__version__)
    assert importlib.metadata.version("gpunet") == gn.__version__


def test_mit_licence_file_and_spdx_expression():
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "the gpunet authors" in text
    assert "Permission is hereby granted, free of charge" in text
    assert not any(c.startswith("License ::") for c in PROJECT.get("classifiers", []))  # the expression says it


def test_extras():
    optional = PROJECT["optional-dependencies"]
    assert optional["cuda12"] == ["cupy-cuda12x[ctk]>=14", "nvidia-nccl-cu12>=2.16,<3"]  # [ctk]: NVRTC, cuBLAS; NCCL
    assert optional["cuda13"] == ["cupy-cuda13x[ctk]>=14", "nvidia-nccl-cu13>=2.27,<3"]
    assert optional["plot"] == ["matplotlib>=3.8"]
    assert not any(d.startswith("matplotlib") for d in PROJECT["dependencies"])
    assert [d for d in optional["bench"] if d.startswith("torch")]
    assert "torch==2.13.0" in optional["test"] and "mypy>=1.11" in optional["test"]
    assert "gpunet[mpi,search,plot,bench,onnx,tensorboard]" in optional["test"]
    assert optional["tensorboard"] == ["tensorboardX>=2.6"]  # gn.callbacks.TensorBoard


def test_every_package_is_in_the_wheel_list():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "gpunet").rglob("__init__.py")}
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_mypy_accepts_the_public_api_and_code_written_against_it():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Success: no issues found" in result.stdout, result.stdout + result.stderr


def test_mypy_refuses_misuse_of_the_public_api(tmp_path):
    """The hints are real: without them mypy would pass this file."""
    bad = tmp_path / "bad.py"
    bad.write_text("import gpunet as gn\nmodel = gn.models.mlp((784, 10))\n"
                   "gn.layers.Dense('784', 10)\ngn.optim.Adam(model, lr='0.1')\ngn.load(3)\n"
                   "name: str = gn.device('cpu')\ngn.fit(model, None, optimizer=model)\n"
                   "loss: float = gn.losses.mse(model.forward(1), 2)\n")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                             "--cache-dir", str(tmp_path / "cache"), str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = sorted(int(m) for m in re.findall(r"bad\.py:(\d+): error", result.stdout))
    assert lines == [3, 4, 5, 6, 7, 8], result.stdout


def test_the_kernels_and_their_headers_are_package_data():
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["gpunet.kernels"] == ["*.cu", "*.cuh"]
    assert {p.suffix for p in (ROOT / "kernels").iterdir() if p.suffix.startswith(".cu")} == {".cu", ".cuh"}


def test_py_typed_is_shipped():
    assert (ROOT / "src" / "gpunet" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["gpunet"]


@pytest.mark.slow
def test_wheel_contents_and_metadata(tmp_path):
    # an isolated build, as pip builds for users: it brings its own setuptools>=77 whatever this environment has
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("gpunet-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
    assert wheel.name.startswith(f"gpunet-{gn.__version__}-py3-none-any")
    cu = {Path(n).name for n in names if n.startswith("gpunet/kernels/") and n.endswith((".cu", ".cuh"))}
    assert cu == {p.name for p in (ROOT / "kernels").glob("*.cu*")} and "common.cuh" in cu  # the sources and their header
    assert "gpunet/py.typed" in names
    data = {f"gpunet/{p.relative_to(ROOT / 'src' / 'gpunet').as_posix()}"
            for folder in ("mnist_sample", "shakespeare") for p in (ROOT / "src" / "gpunet" / "data" / folder).iterdir()}
    assert len(data) >= 5 and data <= names  # the embedded digits and Tiny Shakespeare, with their READMEs
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert "License-Expression: MIT" in meta and "License-File: LICENSE" in meta
    for extra in ("cuda12", "cuda13", "plot", "bench", "mpi", "search", "onnx", "test"):
        assert f"Provides-Extra: {extra}" in meta
    assert "Requires-Dist: cupy-cuda12x[ctk]>=14; extra == \"cuda12\"" in meta
    assert not re.search(r"^Requires-Dist: matplotlib[^;]*$", meta, re.M)  # only under an extra


def test_cache_locations_follow_xdg(monkeypatch, tmp_path):
    for name in ("GPUNET_DATA", "GPUNET_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.data_dir() == paths.cache_dir() == tmp_path / "home" / ".cache" / "gpunet"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "gpunet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.data_dir() == paths.cache_dir() == tmp_path / "xdg" / "gpunet"
    assert gn.data.mnist.cache_dir() == tmp_path / "xdg" / "gpunet"
    from gpunet.backend import gemm_dispatch
    assert gemm_dispatch.default_cache_path() == tmp_path / "xdg" / "gpunet" / "gemm_dispatch.json"
    monkeypatch.setenv("GPUNET_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("GPUNET_CACHE", str(tmp_path / "cache"))
    assert (paths.data_dir(), paths.cache_dir()) == (tmp_path / "data", tmp_path / "cache")
    assert gn.data.mnist.cache_dir(tmp_path / "given") == tmp_path / "given"


def test_info_lists_each_optional_part_and_how_to_add_it(monkeypatch, capsys):
    from gpunet import cli

    monkeypatch.setattr(extras, "present", lambda module: module != "matplotlib")  # as if only it were missing
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    parts = {line.split(":")[0]: line for line in out if line.split(":")[0] in
             ("cupy", "matplotlib", "torch", "mpi4py", "optuna")}
    assert set(parts) == {"cupy", "matplotlib", "torch", "mpi4py", "optuna"}
    assert parts["matplotlib"].startswith("matplotlib: missing") and "pip install 'gpunet[plot]'" in parts["matplotlib"]
    assert "missing" not in parts["torch"]


def test_readme_and_docs_link_only_to_files_in_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    for page in pages:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not links: model["body"](x) calls
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            assert not target.startswith(("http://", "https://")), f"{page.name} links outside: {target}"
            path = target.split("#")[0]
            if path:
                assert (page.parent / path).exists(), f"{page.name}: {target} does not exist"
