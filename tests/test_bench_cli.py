"""`gpunet bench` on a tiny configuration: it runs, and its JSON holds the documented fields.
(The real measurements live in bench/ and in `gpunet bench` itself, never in this suite.)"""
from __future__ import annotations

import json

import pytest

import gpunet as gn
from gpunet.cli import main

RESULT_FIELDS = {"name", "group", "gpunet_s", "torch_s", "ratio", "gpunet_spread", "torch_spread", "rate", "unit",
                 "roofline_rate", "percent_of_roofline", "samples_per_s", "extra", "precision"}


def test_tiny_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    files = {kind: tmp_path / f"bench.{ext}" for kind, ext in (("json", "json"), ("markdown", "md"), ("plot", "png"))}
    argv = ["bench", "--tiny", "--device", "cpu", "--only", "gemm,softmax,dispatch-add,lstm"]
    for kind, path in files.items():
        argv += [f"--{kind}", str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "benchmark" in printed and "ratio" in printed and "gemm-bias-relu-64" in printed
    report = json.loads(files["json"].read_text())
    assert {"date", "device", "machine", "versions", "command", "precision", "tiny", "results", "skipped"} <= set(report)
    assert report["device"] == "cpu" and report["tiny"] is True and report["precision"] == "fp32"
    assert report["versions"]["torch"].startswith("2.13.0")
    names = [r["name"] for r in report["results"]]
    assert names == ["gemm-64", "gemm-bias-relu-64", "softmax-xent-64x10", "dispatch-add-1", "lstm-lm-b4-t8-h16"]
    for r in report["results"]:
        assert set(r) == RESULT_FIELDS and r["precision"] == "fp32"
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


@pytest.mark.parametrize("p,dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_precision_reaches_both_sides_of_the_model_steps(monkeypatch, tmp_path, capsys, p, dtype):
    """--precision: gpunet's model steps run inside precision.using(p) (their products' operands rounded:
    gemm_operands sees p), PyTorch's inside torch.autocast with the matching dtype, and so do the gemm16 rows'
    Dense products; gemm stays fp32. Each row, the JSON and the table say which precision it ran in."""
    import torch

    from gpunet.backend import ops_for_device, precision

    ops, seen, autocasts = ops_for_device("cpu"), [], []
    original, autocast = ops.gemm_operands, torch.autocast

    def recorded(*arrays):
        seen.append(precision.current())
        return original(*arrays)

    def recorded_autocast(device_type, dtype=None, *args, **kwargs):
        autocasts.append((device_type, dtype))
        return autocast(device_type, dtype, *args, **kwargs)

    monkeypatch.setattr(ops, "gemm_operands", recorded)
    monkeypatch.setattr(torch, "autocast", recorded_autocast)
    path = tmp_path / "bench.json"
    argv = ["bench", "--tiny", "--device", "cpu", "--only", "gemm-64,gemm16,mlp", "--precision", p, "--json",
            str(path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"model steps in {p}" in printed and f"precision {p}: the model and gemm16 rows" in printed
    assert set(seen) == {p} and autocasts and set(autocasts) == {("cpu", getattr(torch, dtype))}
    report = json.loads(path.read_text())
    assert report["precision"] == p
    assert [(r["name"], r["precision"]) for r in report["results"]] == [
        ("gemm-64", "fp32"), ("gemm16-bias-relu-64", p), ("mlp-784-300-100-10-b4", p)]


def test_fp16_rows_pytorchs_cpu_autocast_cannot_run_are_skipped_with_why(capsys):
    """torch 2.13's CPU autocast has no float16 LSTM (oneDNN): that row is skipped, saying so; the others run."""
    assert main(["bench", "--tiny", "--device", "cpu", "--only", "lstm,mlp", "--precision", "fp16"]) == 0
    printed = capsys.readouterr().out
    assert "mlp-784-300-100-10-b4" in printed
    assert "skipped lstm-lm-b4-t8-h16: PyTorch 2.13.0" in printed
    assert ("'s CPU autocast in float16 fails on this model: could not create a primitive descriptor for the "
            "LSTM") in printed


def test_bench_refuses_an_unknown_precision_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--tiny", "--precision", "fp8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'fp8'" in err and len(err.splitlines()) == 1
