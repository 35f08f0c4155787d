"""Learning-rate schedules advance every optimizer step: the rates fit uses equal PyTorch's schedulers
stepped once per optimizer step, a resumed run uses the same rates, and a checkpoint saved when
schedules advanced once per evaluation still resumes."""
from __future__ import annotations

import json

import numpy
import pytest
import torch

import gpunet as gn
from gpunet.training import checkpoint

STEPS, BASE_LR = 25, 0.1


class RecordingSGD(gn.optim.SGD):
    """SGD that notes the learning rate each of its steps used."""

    def __init__(self, model, lr):
        super().__init__(model, lr)
        self.used = []

    def step(self):
        self.used.append(self.lr)
        super().step()


SCHEDULES = {
    "step": (lambda o: gn.optim.StepLR(o, 4, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 4, 0.5)),
    # over the whole run (torch's cosine rises again after T_max; ours stays at eta_min, tested below)
    "cosine": (lambda o: gn.optim.CosineLR(o, STEPS, eta_min=0.01),
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, STEPS, eta_min=0.01)),
    "cosine_warmup": (lambda o: gn.optim.CosineLR(o, STEPS, eta_min=0.01, warmup=5),
                      lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
                          torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / 5, end_factor=1.0, total_iters=4),
                          torch.optim.lr_scheduler.CosineAnnealingLR(o, STEPS - 5, eta_min=0.01)], milestones=[5])),
}


def torch_rates(make, steps=STEPS):
    """The learning rate of each optimizer step under PyTorch's scheduler, stepped after every step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched, rates = make(opt), []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def problem(n=64):
    r = numpy.random.default_rng(0)
    x = r.standard_normal((n, 6)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64")


def train(name, steps=STEPS, out=None, resume=False, log=print):
    model = gn.models.mlp((6, 8, 2))
    opt = RecordingSGD(model, BASE_LR)
    x, y = problem()
    gn.fit(model, (x, y), (x[:16], y[:16]), optimizer=opt, steps=steps, batch_size=16, eval_every=7,
           schedule=SCHEDULES[name][0](opt), out_dir=out, resume=resume, progress=False, log=log)
    return opt.used


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_fit_steps_the_schedule_once_per_optimizer_step_as_pytorch(name):
    ours, theirs = train(name), torch_rates(SCHEDULES[name][1])
    assert len(ours) == STEPS
    # Python floats (float64) on both sides, a few roundings of rates <= 1: within 1e-15, and 1e-7 is no
    # more than a rate printed with 7 decimals; a wrong step count or warm-up moves a rate by 1e-3 or more
    numpy.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)
    assert len(set(ours)) > STEPS // 4 * (name != "step")  # many distinct rates, not one per evaluation


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_resume_mid_run_uses_the_same_rates(tmp_path, name):
    straight = train(name)
    first = train(name, steps=11, out=tmp_path)  # mid-epoch, between evaluations at 7 and 14
    second = train(name, steps=STEPS, out=tmp_path, resume=True)
    assert first + second == straight


def test_resume_of_a_checkpoint_whose_schedule_counted_evaluations(tmp_path):
    straight = train("cosine")
    first = train("cosine", steps=14, out=tmp_path)
    path = tmp_path / "last.safetensors"
    weights, extra, meta = checkpoint.read_checkpoint(path)
    training = meta["training"]
    del training["schedule_unit"]
    training["schedule"] = 2  # two evaluations (steps 7 and 14), as an older gpunet counted
    model = gn.models.mlp((6, 8, 2)).load_state_dict(weights)
    checkpoint.save(model, path, extra_tensors=extra, extra_metadata={"training": training})
    said = []
    second = train("cosine", steps=STEPS, out=tmp_path, resume=True, log=said.append)
    assert first + second == straight
    assert any("advanced once per evaluation" in line and "from step 14" in line for line in said), said


def test_history_records_the_rate_of_each_evaluations_last_step(tmp_path):
    train("cosine", out=tmp_path)
    theirs = torch_rates(SCHEDULES["cosine"][1])
    records = json.loads((tmp_path / "history.json").read_text())
    assert [r["step"] for r in records] == [7, 14, 21, 25]
    for record in records:
        assert record["lr"] == pytest.approx(theirs[record["step"] - 1], abs=1e-7)


def test_cosine_stays_at_eta_min_after_t_max():
    sched = gn.optim.CosineLR(gn.optim.SGD(gn.models.mlp((2, 2)), 0.1), 10, eta_min=0.02)
    assert [sched.lr_at(k) for k in (10, 11, 500)] == [pytest.approx(0.02, abs=1e-12)] * 3


def test_cosine_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match=r"CosineLR: warmup \(20 steps\) must be shorter than t_max \(20 steps\)"):
        gn.optim.CosineLR(gn.optim.SGD(gn.models.mlp((2, 2)), 0.1), 20, warmup=20)


def test_cli_cosine_decays_over_every_step(tmp_path):
    from gpunet.cli import main
    out = tmp_path / "run"
    assert main(["train", "--steps", "40", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "history.json").read_text())
    theirs = torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 40), steps=40)
    scale = 1e-3 / BASE_LR  # the mlp recipe's Adam rate
    assert records  # (one evaluation at the end: 40 steps are less than an epoch of the sample)
    for record in records:
        assert record["lr"] == pytest.approx(theirs[record["step"] - 1] * scale, abs=1e-9)
