"""The training precision as a setting of runs: fit(precision=...) validated, saved with the run and in
model.safetensors, kept on resume unless another is given (then said in one line), evaluate and predict in
float32 unless asked; the command line's --precision."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.backend import precision
from gpunet.training.checkpoint import read_checkpoint
from tests.support.arrays import rng


def data(n=128):
    x = rng(1).standard_normal((n, 6)).astype("float32")
    return x, x[:, :3].argmax(axis=1)


def train(out, steps, **kw):
    gn.manual_seed(0)
    model = gn.models.mlp((6, 8, 3))
    said = []
    gn.fit(model, data(), data(), optimizer=gn.optim.Adam(model, lr=1e-2), steps=steps, batch_size=32, out_dir=out,
           progress=False, log=said.append, **kw)
    return model, said


def saved_precision(path):
    return read_checkpoint(path)[2]["training"]["config"]["precision"]


def test_the_precision_is_saved_and_a_resume_keeps_it(tmp_path):
    _, said = train(tmp_path / "run", 4, precision="bf16")
    assert saved_precision(tmp_path / "run" / "last.safetensors") == "bf16"
    assert read_checkpoint(tmp_path / "run" / "model.safetensors")[2]["training_precision"] == "bf16"
    assert read_checkpoint(tmp_path / "run" / "model.safetensors")[0]["0.weight"].dtype == numpy.float32
    _, said = train(tmp_path / "run", 6, resume=True)  # not given: the run's own
    assert saved_precision(tmp_path / "run" / "last.safetensors") == "bf16"
    assert not [line for line in said if "precision" in line]
    _, said = train(tmp_path / "run", 8, resume=True, precision="fp16")  # given: applied and said
    assert [line for line in said if "precision" in line] == [
        'resume: applying changed settings from step 6: precision: "bf16" -> "fp16"']
    assert saved_precision(tmp_path / "run" / "last.safetensors") == "fp16"


def test_the_steps_run_in_the_precision_and_evaluate_in_float32_unless_asked(monkeypatch):
    seen = []
    original = gn.backend.ops.Ops.gemm_operands

    def spy(self, *arrays):
        seen.append(precision.current())
        return original(self, *arrays)

    monkeypatch.setattr(gn.backend.ops.Ops, "gemm_operands", spy)
    model, _ = train(None, 2, precision="fp16")
    assert set(seen) <= {"fp16"}  # (every product of the run's steps and evaluations)
    assert precision.current() == "fp32"  # the thread's setting is put back
    seen.clear()
    gn.evaluate(model, *data())
    model.predict(data()[0])
    assert set(seen) <= {"fp32"}
    seen.clear()
    gn.evaluate(model, *data(), precision="bf16")
    model.predict(data()[0], precision="bf16")
    assert set(seen) <= {"bf16"}


@pytest.mark.parametrize("call, message", [
    (lambda m: gn.fit(m, data(), optimizer=gn.optim.SGD(m, lr=0.1), steps=1, precision="fp8"),
     r"^fit: precision must be one of fp32, bf16, fp16, got 'fp8'$"),
    (lambda m: gn.evaluate(m, *data(), precision="half"), r"^evaluate: precision must be one of fp32, bf16, fp16, got 'half'$"),
    (lambda m: m.predict(data()[0], precision=16), r"^predict: precision must be one of fp32, bf16, fp16, got 16$"),
])
def test_an_unknown_precision_is_one_line(call, message):
    with pytest.raises(ValueError, match=message):
        call(gn.models.mlp((6, 8, 3)))


def test_the_command_line_takes_precision(tmp_path, capsys):
    from gpunet.cli import main
    # (the CPU: on the stand-in the GEMM dispatch would time four emulated 16-bit paths per size class)
    code = main(["train", "--model", "mlp", "--steps", "2", "--precision", "bf16", "--out", str(tmp_path / "r"),
                 "--no-progress", "--device", "cpu"])
    assert code == 0
    assert saved_precision(tmp_path / "r" / "last.safetensors") == "bf16"
    with pytest.raises(SystemExit):
        main(["train", "--model", "mlp", "--steps", "2", "--precision", "fp64", "--out", str(tmp_path / "s")])
    assert "invalid choice: 'fp64'" in capsys.readouterr().err
