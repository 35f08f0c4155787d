"""GEMM dispatch by measurement: the fastest candidate per size class, remembered on disk per
device, TF32 mode and kernel version; a damaged cache is ignored."""
from __future__ import annotations

import json

from gpunet.backend.gemm_dispatch import GemmDispatch, size_class, source_hash


def fake_timer(times):
    calls = []

    def measure(fn):
        calls.append(fn)
        return times[fn()]
    return measure, calls


def test_picks_the_fastest_and_remembers_it(tmp_path):
    measure, calls = fake_timer({"fused": 2.0, "cublas": 1.0})
    candidates = lambda: {"fused": lambda: "fused", "cublas": lambda: "cublas"}  # noqa: E731
    dispatch = GemmDispatch("H200 sm_90", "abc", tmp_path / "d.json", measure, tf32=False)
    assert dispatch.choose(100, 1000, 300, "relu", candidates) == "cublas"
    assert dispatch.choose(120, 1024, 400, "relu", candidates) == "cublas"  # same class: not measured again
    assert len(calls) == 2
    again = GemmDispatch("H200 sm_90", "abc", tmp_path / "d.json", fake_timer({})[0], tf32=False)
    assert again.choose(128, 1000, 300, "relu", candidates) == "cublas"  # read from disk, no timing


def test_new_kernel_source_or_device_measures_again(tmp_path):
    candidates = lambda: {"fused": lambda: "fused", "cublas": lambda: "cublas"}  # noqa: E731
    GemmDispatch("H200 sm_90", "v1", tmp_path / "d.json", fake_timer({"fused": 2.0, "cublas": 1.0})[0],
                 tf32=False).choose(64, 64, 64, None, candidates)
    measure, calls = fake_timer({"fused": 1.0, "cublas": 2.0})
    again = GemmDispatch("H200 sm_90", "v2", tmp_path / "d.json", measure, tf32=False)
    assert again.choose(64, 64, 64, None, candidates) == "fused"
    assert len(calls) == 2
    stored = json.loads((tmp_path / "d.json").read_text())
    assert stored["H200 sm_90|fp32|v1"] == {"64x64x64:bias": "cublas"}
    assert stored["H200 sm_90|fp32|v2"] == {"64x64x64:bias": "fused"}


def test_tf32_mode_is_part_of_the_key(tmp_path):
    """TF32 makes cuBLAS faster, so a choice made in one mode says nothing about the other."""
    candidates = lambda: {"fused": lambda: "fused", "cublas": lambda: "cublas"}  # noqa: E731
    GemmDispatch("H200 sm_90", "v1", tmp_path / "d.json", fake_timer({"fused": 1.0, "cublas": 2.0})[0],
                 tf32=False).choose(64, 64, 64, "relu", candidates)
    measure, calls = fake_timer({"fused": 2.0, "cublas": 1.0})
    tf32 = GemmDispatch("H200 sm_90", "v1", tmp_path / "d.json", measure, tf32=True)
    assert tf32.choose(64, 64, 64, "relu", candidates) == "cublas" and len(calls) == 2  # measured again
    full = GemmDispatch("H200 sm_90", "v1", tmp_path / "d.json", fake_timer({})[0], tf32=False)
    assert full.choose(64, 64, 64, "relu", candidates) == "fused"  # each mode keeps its own choice
    assert set(json.loads((tmp_path / "d.json").read_text())) == {"H200 sm_90|fp32|v1", "H200 sm_90|tf32|v1"}


def test_damaged_cache_is_ignored_and_rewritten(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("{not json")
    dispatch = GemmDispatch("gpu", "v1", path, fake_timer({"fused": 1.0, "cublas": 2.0})[0], tf32=False)
    assert dispatch.choose(3, 5, 7, "gelu", lambda: {"fused": lambda: "fused", "cublas": lambda: "cublas"}) == "fused"
    assert json.loads(path.read_text()) == {"gpu|fp32|v1": {"4x8x8:gelu": "fused"}}


def test_size_classes_and_hash():
    assert size_class(1, 1, 1, None) == "1x1x1:bias"
    assert size_class(129, 4096, 4097, "relu") == "256x4096x8192:relu"
    assert source_hash("a") != source_hash("b") and len(source_hash("a")) == 16
