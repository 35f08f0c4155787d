"""`gpunet bench` on a tiny configuration: it runs, and its JSON holds the documented fields.
(The real measurements live in bench/ and in `gpunet bench` itself, never in this suite.)"""
from __future__ import annotations

import json

import pytest

import gpunet as gn
from gpunet.cli import main

RESULT_FIELDS = {"name", "group", "gpunet_s", "torch_s", "ratio", "gpunet_spread", "torch_spread", "rate", "unit",
                 "roofline_rate", "percent_of_roofline", "samples_per_s", "extra"}


def test_tiny_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    files = {kind: tmp_path / f"bench.{ext}" for kind, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    argv = ["bench", "--tiny", "--device", "cpu", "--only", "gemm,softmax,dispatch-add,lstm"]
    for kind, path in files.items():
        argv += [f"--{kind}", str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "benchmark" in printed and "ratio" in printed and "gemm-bias-relu-64" in printed
    report = json.loads(files["json"].read_text())
    assert {"date", "device", "machine", "versions", "command", "tiny", "results", "skipped"} <= set(report)
    assert report["device"] == "cpu" and report["tiny"] is True and report["versions"]["torch"].startswith("2.13.0")
    names = [r["name"] for r in report["results"]]
    assert names == ["gemm-64", "gemm-bias-relu-64", "softmax-xent-64x10", "dispatch-add-1", "lstm-lm-b4-t8-h16"]
    for r in report["results"]:
        assert set(r) == RESULT_FIELDS
        assert r["gpunet_s"] > 0 and r["torch_s"] > 0 and r["ratio"] == pytest.approx(r["gpunet_s"] / r["torch_s"])
    gemm = report["results"][0]
    assert gemm["unit"] == "GFLOP/s" and gemm["rate"] == pytest.approx(2 * 64**3 / gemm["gpunet_s"] / 1e9)
    assert gemm["percent_of_roofline"] > 0
    assert report["results"][-1]["samples_per_s"] > 0
    if not gn.has_gpu():
        assert report["skipped"][0][0] == "every GPU comparison"
    assert files["markdown"].read_text().count("| gemm-") == 2
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_only_matching_nothing_is_an_error():
    with pytest.raises(SystemExit, match="--only nothing-like-this matches no benchmark; names: gemm-64"):
        main(["bench", "--tiny", "--device", "cpu", "--only", "nothing-like-this"])
