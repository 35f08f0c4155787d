"""Optimizers, schedules and clipping against torch.optim over several steps."""
from __future__ import annotations

import numpy
import pytest
import torch

import gpunet as gn
from tests.support.arrays import on, rng
from tests.support.tolerance import U, assert_within, ulps


def twins():
    model = gn.models.mlp((6, 5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    return model, twin


CASES = {
    "sgd": (dict(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum_wd": (dict(lr=0.05, momentum=0.9, weight_decay=0.01),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "sgd_nesterov": (dict(lr=0.05, momentum=0.8, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True)),
    "adam": (dict(lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    "adam_wd": (dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
                lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    "adamw": (dict(lr=0.01, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_matches_pytorch_over_steps(case, device):
    kwargs, make_torch = CASES[case]
    cls = {"sgd": gn.optim.SGD, "adam": gn.optim.Adam, "adamw": gn.optim.AdamW}[case.split("_")[0]]
    model, twin = twins()
    model.to(device)
    opt, topt = cls(model, **kwargs), make_torch(twin.parameters())
    step_both(model, twin, opt, topt, device, 6, case)


def step_both(model, twin, opt, topt, device, steps, label):
    """Each step from the same parameters and gradients: torch gets ours (the forward and backward are
    compared with torch in tests/layers; a parameter torch does not train gets no gradient), so only
    the optimizers' arithmetic may differ, elementwise."""
    for step in range(steps):
        x = rng(step).standard_normal((8, 6)).astype("float32")
        y = rng(100 + step).integers(0, 3, 8)
        _, grad = gn.losses.softmax_cross_entropy(model.forward(on(device, x)), on(device, y))
        model.backward(grad)
        before = {k: gn.to_numpy(v).copy() for k, v in model.params.items()}
        twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in before.items()})
        for key, p in twin.named_parameters():
            p.grad = torch.from_numpy(gn.to_numpy(model.grads[key]).copy()) if p.requires_grad else None
        opt.step()
        topt.step()
        for key, value in twin.state_dict().items():
            want = value.numpy()
            assert_within(gn.to_numpy(model.params[key]), want, update_atol(before[key], want, step + 1),
                          f"{label} {key} at step {step}")


def update_atol(before, after, steps):
    """An optimizer step is elementwise: p - update, update about 16 roundings of its own size
    (decay, momentum or moments, bias corrections, sqrt, division) and the subtraction one of
    |p| + |update|. The moments (or velocity) carry the earlier steps' roundings, and a side that
    forms 1 - beta in float32 (the GPU kernel) differs from 1 - beta in float64 by u beta / (1 - beta),
    at most 99 u for the betas and momenta here (0.99): per step, of the update. Two sides."""
    update = numpy.abs(after.astype("float64") - before)
    per_step = 2 * 16 * 2 * U + 99 * U
    return 2 * 2 * U * (numpy.abs(before) + update) + steps * per_step * update + ulps(after, 1)


def test_schedules_match_pytorch():
    model, twin = twins()
    topt = torch.optim.SGD(twin.parameters(), lr=0.5)
    for ours, theirs in ((lambda o: gn.optim.StepLR(o, 3, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
                         (lambda o: gn.optim.CosineLR(o, 10, 0.01),
                          lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, 0.01))):
        opt = gn.optim.SGD(model, lr=0.5)
        topt.param_groups[0]["lr"] = 0.5
        sched, tsched = ours(opt), theirs(topt)
        for _ in range(10):
            sched.step()
            topt.step()
            tsched.step()
            assert opt.lr == pytest.approx(topt.param_groups[0]["lr"], rel=1e-9)


def test_clip_grad_norm_matches_pytorch():
    model, twin = twins()
    for key, p in twin.named_parameters():
        g = rng(len(key)).standard_normal(p.shape).astype("float32")
        p.grad = torch.from_numpy(g.copy())
        model.grads[key][...] = g
    norm = gn.optim.clip_grad_norm(model, 0.5)
    tnorm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    assert float(norm) == pytest.approx(tnorm.item(), rel=1e-5)  # a float64 sum here, float32 of 53 squares in torch
    # each gradient times min(1, max_norm / (norm + 1e-6)): torch's float32 norm within gamma_53 / 2 = 1.6e-6
    # relative, and two roundings; 1e-5 covers both
    for key, p in twin.named_parameters():
        numpy.testing.assert_allclose(model.grads[key], p.grad.numpy(), rtol=1e-5)


def test_optimizer_state_round_trips(device):
    model, _ = twins()
    model.to(device)
    opt = gn.optim.Adam(model, lr=0.01)
    for name in model.grads:
        model.grads[name][...] = 0.1
    opt.step()
    arrays, meta = opt.state_dict()
    fresh = gn.optim.Adam(model, lr=0.5)
    fresh.load_state_dict(arrays, meta)
    assert fresh.step_count == 1 and fresh.lr == 0.01
    numpy.testing.assert_array_equal(gn.to_numpy(fresh.state["0.weight"]["exp_avg"]),
                                     gn.to_numpy(opt.state["0.weight"]["exp_avg"]))


def test_bad_hyperparameters():
    model, _ = twins()
    with pytest.raises(ValueError, match="lr must be positive"):
        gn.optim.SGD(model, lr=0)
    assert gn.optim.SGD(model, lr=numpy.float32(0.25)).lr == 0.25  # any real number, NumPy's too
    with pytest.raises(ValueError, match="Nesterov"):
        gn.optim.SGD(model, lr=0.1, nesterov=True)
