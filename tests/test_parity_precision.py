"""gpunet parity --precision bf16|fp16: the same seeded steps in fp32 and in mixed precision on one device,
in lockstep, each layer's activations and the loss held to gpunet.parity_bound.precision_bound (derived from
the 16-bit format's unit roundoff and the products on the path, never from a measurement); a planted bug is
named by its layer and step. In fp16 the mixed side scales its loss as gn.fit does; a forced overflow is listed,
skipped by both sides, and the other steps are still held to the bound."""
from __future__ import annotations

import numpy
import pytest

from gpunet import parity
from gpunet.backend import ops_for_device, precision
from gpunet.cli import main
from gpunet.layers import Dense, ReLU
from gpunet.parity_bound import LAMBDA, UNIT_16, precision_bound, product_bound, product_sums, step_bound

STEPS, BATCH = 2, 4
CASES = [(model, p) for model in ("mlp", "cnn") for p in ("bf16", "fp16")]


@pytest.mark.parametrize("model,p", CASES)
def test_recipes_within_the_formats_bound(model, p):
    report = parity.compare(model, steps=STEPS, batch_size=BATCH, precision=p)
    assert report["devices"] == ["cpu", "cpu"] and report["lockstep"] and report["precision"] == p
    assert report["first_over"] is None, parity.format_report(report)
    for name, diff, bound in zip(report["layers"], report["activation_diff"], report["row_bounds"]):
        assert 0 < diff <= bound, f"{model} {p} {name}: {diff:.2e} > {bound:.2e}"
    assert max(report["loss_diff"]) <= report["bound"]
    assert report["overflows"] == [] and None not in report["step_grad_diff"]  # 2**16 overflows nothing here
    said = {"bf16": "loss scaling: none in bf16, as in training",
            "fp16": "loss scaling: fp16's dynamic loss scale, gn.fit's (from 65536, halved and the step skipped when a "
                    "gradient overflows, doubled after 2000 clean steps): 0 overflows"}[p]
    assert said in parity.format_report(report)


def round_to_bits(a, bits: int):
    """a rounded to `bits` significant bits (a planted bug: 3 for bf16's 8, 5 for fp16's 11)."""
    mantissa, exponent = numpy.frexp(numpy.asarray(a, dtype=numpy.float64))
    return numpy.ldexp(numpy.round(mantissa * 2**bits) / 2**bits, exponent).astype(numpy.float32)


def coarse_first_product(monkeypatch, bits: int):
    """The first product of the mixed-precision side's first step gets operands rounded to `bits` bits."""
    ops = ops_for_device("cpu")
    original = ops.gemm_operands
    calls = []

    def planted(*arrays):
        rounded = original(*arrays)
        if precision.current() == "fp32":
            return rounded
        calls.append(1)
        return tuple(round_to_bits(a, bits) if len(calls) == 1 and a is not None else a for a in rounded)

    monkeypatch.setattr(ops, "gemm_operands", planted)
    return calls


@pytest.mark.parametrize("p,bits", [("bf16", 3), ("fp16", 5)])
@pytest.mark.parametrize("model,layer", [("mlp", "0: Dense"), ("cnn", "0: Conv2D")])
def test_a_planted_coarse_rounding_is_named(monkeypatch, model, layer, p, bits):
    calls = coarse_first_product(monkeypatch, bits)
    report = parity.compare(model, steps=STEPS, batch_size=BATCH, precision=p)
    assert len(calls) > 1
    over = report["first_over"]
    assert over is not None and over["step"] == 1 and over["where"].startswith(f"layer {layer}"), over
    assert over["diff"] > over["bound"] == report["row_bounds"][0]
    assert f"first layer or loss over its bound: step 1, layer {layer}" in parity.format_report(report)


def test_the_bound_is_the_formula():
    dense, u16 = Dense(8, 4), UNIT_16["bf16"]
    assert product_sums(dense, (2, 8)) == (1, 1) and product_sums(ReLU(), (2, 4)) == (0, 0)
    layers = [dense, ReLU(), Dense(4, 3)]
    assert product_bound(layers, (2, 8), u16) == 2 * LAMBDA * 4 * u16  # two products forward, two backward
    assert product_bound(layers, (2, 8), u16, upto=1) == 2 * LAMBDA * 1 * u16  # the first layer's forward
    assert precision_bound(layers, (2, 8), 3, u16) == product_bound(layers, (2, 8), u16) + step_bound(layers, (2, 8), 3)
    assert UNIT_16 == {"bf16": 2.0**-8, "fp16": 2.0**-11}


def test_compare_checks_its_arguments():
    with pytest.raises(ValueError, match="one device"):
        parity.compare("mlp", steps=1, devices=("cpu", "gpu"), batch_size=BATCH, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        parity.compare("mlp", steps=1, batch_size=BATCH, precision="fp8")


def test_the_command_line(capsys):
    assert main(["parity", "--model", "mlp", "--steps", "1", "--batch-size", "4", "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "parity of mlp: fp32 vs fp16 on cpu, 1 steps" in out and "first layer or loss over its bound: none" in out
    assert "gn.fit's (from 65536, halved" in out and "0 overflows" in out


@pytest.mark.parametrize("given", [[], ["--precision", "fp32"]])
def test_fp32_is_the_cpu_against_the_gpu_as_before(monkeypatch, given):
    seen = {}

    def recorded(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise SystemExit(0)

    monkeypatch.setattr("gpunet.device", lambda name: None)
    monkeypatch.setattr(parity, "compare", recorded)
    with pytest.raises(SystemExit):
        main(["parity", "--model", "mlp", "--steps", "1", *given])
    assert seen["args"][2] == ("cpu", "gpu") and "precision" not in seen["kwargs"]


def tanh_mlp():
    """A tanh mlp without dropout (no kinks: its gradients are held to the bound too; no masks: a step's result
    does not depend on its index), with the mlp recipe's preprocessing, and the recipe's first 3 batches of 3."""
    import gpunet as gn

    recipe_model, data, _ = parity.model_and_batches("mlp", 3, 3, 0)
    gn.manual_seed(0)
    model = gn.models.mlp((784, 64, 32, 10), activation="tanh")
    model.preprocess = recipe_model.preprocess
    return model, data


def test_a_forced_overflow_is_listed_skipped_by_both_sides_and_the_other_steps_hold():
    """Starting at 2**18, the first step's scaled loss gradient (up to (1 - p) / 3 of it per element at batch 3)
    leaves fp16's 65504 where the products round it: the scaler skips the step and halves the scale; at 2**17
    the next steps are clean. Both sides skip step 1: their later losses are bit for bit those of a run that
    starts at step 2 (Adam's step count and bias correction included); steps 2 and 3 stay within the bound."""
    model, data = tanh_mlp()
    report = parity.compare(model, steps=3, data=data, precision="fp16", init_scale=2.0**18)
    assert report["overflows"] == [{"step": 1, "scale_before": 2.0**18, "scale_after": 2.0**17}]
    assert report["first_over"] is None and report["gradients_over"] == [], parity.format_report(report)
    assert report["step_grad_diff"][0] is None and 0 < max(report["step_grad_diff"][1:]) <= report["bound"]
    assert max(report["loss_diff"]) <= report["bound"] and max(report["step_activation_diff"]) <= report["bound"]
    later = parity.compare(model, steps=2, data=data[1:], precision="fp16")
    assert later["overflows"] == [] and report["losses"][1:] == later["losses"]
    text = parity.format_report(report)
    assert "from 262144, halved and the step skipped when a gradient overflows" in text and "): 1 overflow\n" in text
    assert ("  overflow at step 1: loss scale 262144 -> 131072, the step's update skipped in fp32 and fp16 alike "
            "(its gradients not compared)") in text
    step_rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert step_rows[0][-1] == "skipped" and step_rows[1][-1] != "skipped"  # step 1's gradients: not compared


def test_the_mixed_side_steps_with_the_unscaled_gradients_it_reports():
    """The fp16 side's gradients are unscaled once, before they are compared, and its update (the scaler's step
    and update) steps with those: after it they are still within the bound of the fp32 side's (unscaled a second
    time, in place, they would be 2**16 times smaller)."""
    from gpunet.backend import to_numpy

    model, data = tanh_mlp()
    sides = [parity._Side(model, "cpu", 1e-3, p) for p in ("fp32", "fp16")]
    for side in sides:
        side.step(0, *data[0])
    assert [side.apply() for side in sides] == [None, None]  # no overflow at 2**16
    assert sides[1].scaler.applied == 1 and sides[1].optimizer.step_count == sides[0].optimizer.step_count == 1
    bound = parity.compare(model, steps=1, data=data, precision="fp16")["bound"]
    for k, grad in sides[0].model.grads.items():
        assert parity.relative_difference(to_numpy(sides[1].model.grads[k]), to_numpy(grad)) <= bound, k


def test_the_loss_scale_option(capsys):
    assert main(["parity", "--model", "mlp", "--steps", "2", "--batch-size", "3", "--precision", "fp16",
                 "--loss-scale", str(2**40)]) == 0
    out = capsys.readouterr().out
    assert "overflow at step 1: loss scale 1.09951e+12 -> 5.49756e+11" in out and "overflow at step 2" in out
    assert "parameter gradients: none compared (every step overflowed)" in out
    for given in (["--precision", "bf16"], []):
        with pytest.raises(SystemExit) as exc:
            main(["parity", "--loss-scale", "1024", *given])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == ("gpunet parity: --loss-scale 1024 is fp16's starting loss scale: it needs --precision fp16 "
                       "(bf16 and fp32 have no loss scaling)")
    with pytest.raises(ValueError, match="init_scale is fp16's starting loss scale"):
        parity.compare("mlp", steps=1, batch_size=BATCH, precision="bf16", init_scale=1024.0)


@pytest.mark.parametrize("p", ["bf16", "fp16"])
def test_without_kinks_the_gradients_are_within_the_bound_too(p):
    """The gradients are reported, not a verdict, because a ReLU's kink within the forward's difference switches
    an element's gradient; a tanh mlp has none, and its gradients stay within the step's bound."""
    import gpunet as gn

    recipe_model, data, _ = parity.model_and_batches("mlp", STEPS, BATCH, 0)
    gn.manual_seed(0)
    model = gn.models.mlp((784, 64, 32, 10), activation="tanh")
    model.preprocess = recipe_model.preprocess
    report = parity.compare(model, steps=STEPS, data=data, precision=p)
    assert report["first_over"] is None and report["gradients_over"] == []
    assert 0 < max(report["step_grad_diff"]) <= report["bound"]


@pytest.mark.gpu
def test_on_the_gpu_within_the_bound():
    """The same comparison on the GPU (the stand-in in CI): its mixed precision against its fp32."""
    from tests.support.arrays import GPU

    if GPU not in ("real", "standin"):
        pytest.skip(f"no GPU: {GPU}")
    report = parity.compare("mlp", steps=1, devices=("gpu", "gpu"), batch_size=BATCH, precision="bf16")
    assert report["devices"] == ["gpu", "gpu"] and report["first_over"] is None, parity.format_report(report)


@pytest.mark.gpu
def test_on_the_gpu_the_device_scaler_finds_the_same_overflow():
    """fp16 on the GPU (the stand-in in CI): the scaler's state, its check and the skip on the device (fit's
    kernels, read back after each step); the CPU's forced overflow is found there too, listed, and the steps
    after it are held to the bound."""
    from tests.support.arrays import GPU

    if GPU not in ("real", "standin"):
        pytest.skip(f"no GPU: {GPU}")
    model, data = tanh_mlp()
    report = parity.compare(model, steps=3, devices=("gpu", "gpu"), data=data, precision="fp16", init_scale=2.0**18)
    assert report["overflows"] == [{"step": 1, "scale_before": 2.0**18, "scale_after": 2.0**17}]
    assert report["first_over"] is None and report["gradients_over"] == [], parity.format_report(report)
    assert report["step_grad_diff"][0] is None and 0 < max(report["step_grad_diff"][1:]) <= report["bound"]
