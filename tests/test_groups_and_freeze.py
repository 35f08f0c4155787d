"""Parameter groups (groups= on every optimizer) and freezing (layer.freeze()): against torch.optim
with param groups and requires_grad=False, stepped in lockstep from the same gradients; a frozen
layer untouched by gn.fit, without optimizer state and outside clip_grad_norm's norm; schedules
scaling every group's rate; resume exactness; CUDA-graph replay; the one-line refusals."""
from __future__ import annotations

import numpy
import pytest
import torch

import gpunet as gn
from tests.support.arrays import ON_STANDIN, rng
from tests.support.reliability import one_error_line, snapshot
from tests.test_optim import step_both


def twins(sizes=(6, 5, 4, 3)):
    model = gn.models.mlp(sizes)
    twin = torch.nn.Sequential(*[m for i in range(len(sizes) - 1) for m in
                                 (torch.nn.Linear(sizes[i], sizes[i + 1]), torch.nn.ReLU())][:-1])
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()})
    return model, twin


# groups: layer 0 at a tenth of the rate without weight decay; layer 2 frozen; layer 4 the optimizer's own
CASES = {
    "sgd": (gn.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01), {"lr": 0.005, "weight_decay": 0.0},
            torch.optim.SGD),
    "adam": (gn.optim.Adam, dict(lr=0.01, weight_decay=0.05), {"lr": 0.001, "weight_decay": 0.0, "betas": (0.8, 0.99)},
             torch.optim.Adam),
    "adamw": (gn.optim.AdamW, dict(lr=0.01, weight_decay=0.1), {"lr": 0.002, "eps": 1e-6}, torch.optim.AdamW),
}


def lockstep(case, device, steps=5):
    cls, kwargs, group, torch_cls = CASES[case]
    model, twin = twins()
    model.to(device)
    model[2].freeze()
    opt = cls(model, groups={"0.*": group}, **kwargs)
    twin[2].requires_grad_(False)
    first = [p for k, p in twin.named_parameters() if k.startswith("0.")]
    rest = [p for k, p in twin.named_parameters() if not k.startswith("0.")]
    topt = torch_cls([{"params": first, **group}, {"params": rest}], **kwargs)
    start = {k: gn.to_numpy(v).copy() for k, v in model.params.items()}
    step_both(model, twin, opt, topt, device, steps, case)  # torch gets no gradient for its frozen layer
    return model, opt, start


@pytest.mark.parametrize("case", sorted(CASES))
def test_groups_and_a_frozen_layer_match_pytorch(case):
    model, opt, start = lockstep(case, "cpu")
    for key in ("2.weight", "2.bias"):
        numpy.testing.assert_array_equal(gn.to_numpy(model.params[key]), start[key], err_msg=key)
        assert key not in opt.state  # no momentum, no moments for a frozen layer
        assert not gn.to_numpy(model.grads[key]).any()  # its gradients were never computed
    assert not numpy.array_equal(gn.to_numpy(model.params["0.weight"]), start["0.weight"])


@pytest.mark.gpu
def test_groups_and_a_frozen_layer_match_pytorch_on_the_gpu():
    model, opt, start = lockstep("sgd", "gpu", steps=3)
    numpy.testing.assert_array_equal(gn.to_numpy(model.params["2.weight"]), start["2.weight"])


def data(n=96, features=6, classes=3, seed=0):
    r = numpy.random.default_rng(seed)
    return r.standard_normal((n, features)).astype("float32"), r.integers(0, classes, n)


def test_a_frozen_layer_is_bit_identical_after_fit():
    model = gn.models.mlp((6, 8, 8, 3))
    model[0].freeze()
    frozen = {k: v.copy() for k, v in model.params.items() if k.startswith("0.")}
    others = {k: v.copy() for k, v in model.params.items() if not k.startswith("0.")}
    opt = gn.optim.AdamW(model, lr=0.01, weight_decay=0.5)  # decay would move every trained weight
    gn.fit(model, data(), optimizer=opt, steps=6, batch_size=32, clip_norm=1.0, progress=False)
    for key, value in frozen.items():
        numpy.testing.assert_array_equal(model.params[key], value, err_msg=key)
        assert key not in opt.state
    for key, value in others.items():
        assert not numpy.array_equal(model.params[key], value), key
    assert model[0].unfreeze() is model[0] and not model[0].frozen


def test_clip_grad_norm_leaves_out_frozen_gradients():
    model = gn.models.mlp((6, 5, 4, 3))
    model[2].freeze()
    x, y = data(16)
    _, grad = gn.losses.softmax_cross_entropy(model.forward(x), y)
    model.backward(grad)
    grads = {k: model.grads[k].astype("float64").copy() for k in model.params}
    assert not grads["2.weight"].any()  # a frozen Dense layer skips its dW and db
    want = numpy.sqrt(sum((g * g).sum() for k, g in grads.items() if not k.startswith("2.")))
    got = float(gn.optim.clip_grad_norm(model, 1e-3))
    assert got == pytest.approx(want, rel=1e-6)
    # and the layer before it still gets its gradient through it: the same as with it trained
    twin = gn.models.mlp((6, 5, 4, 3))
    twin.load_state_dict(model.state_dict())
    _, grad = gn.losses.softmax_cross_entropy(twin.forward(x), y)
    twin.backward(grad)
    for key in ("0.weight", "0.bias"):
        numpy.testing.assert_allclose(grads[key], twin.grads[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_a_frozen_first_layer_is_skipped_by_backward_params():
    model = gn.models.mlp((6, 5, 3))
    model[0].freeze()
    x, y = data(8, classes=3)
    _, grad = gn.losses.softmax_cross_entropy(model.forward(x), y)
    assert model.backward_params(grad) is None
    assert not model.grads["0.weight"].any() and model.grads["2.weight"].any()
    model.freeze()  # all of it: nothing runs, not even the last layer's gradients
    model.grads["2.weight"][...] = 0
    model.backward_params(grad)
    assert not model.grads["2.weight"].any()


def test_a_schedule_scales_every_group_rate():
    """SGD without momentum on float64: a step moves a weight by exactly lr * gradient."""
    model = gn.models.mlp((4, 3)).to(dtype="float64")
    opt = gn.optim.SGD(model, lr=0.5, groups={"*.bias": {"lr": 0.05}})
    sched = gn.optim.CosineLR(opt, t_max=8, eta_min=0.01, warmup=2)
    for k in range(10):
        for g in model.grads.values():
            g[...] = 1.0
        before = {key: v.copy() for key, v in model.params.items()}
        opt.step()
        sched.step()
        factor = sched.lr_at(k) / 0.5
        assert (before["0.weight"] - model.params["0.weight"]) == pytest.approx(0.5 * factor, rel=1e-12)
        assert (before["0.bias"] - model.params["0.bias"]) == pytest.approx(0.05 * factor, rel=1e-12)
    assert sched.lr_at(9) == 0.01  # the end: eta_min for the optimizer's own rate, scaled for the group's
    assert opt._settings(1)[0] == pytest.approx(0.05 * 0.01 / 0.5, rel=1e-12)


def fit_run(out, steps, resume=False, groups=True):
    gn.manual_seed(3)
    model = gn.models.mlp((6, 8, 8, 3), dropout=0.1)  # Dense, ReLU, Dropout, Dense, ReLU, Dropout, Dense
    model[3].freeze()
    opt = gn.optim.Adam(model, lr=0.02, groups={"6.*": {"lr": 0.002, "weight_decay": 0.1}} if groups else None)
    gn.fit(model, data(), optimizer=opt, steps=steps, batch_size=32, schedule=gn.optim.CosineLR(opt, 8),
           out_dir=out, resume=resume, seed=3, progress=False, restore_best=False, log=lambda line: None)
    return model, opt


def test_resume_with_groups_and_a_frozen_layer_is_exact(tmp_path):
    straight, _ = fit_run(tmp_path / "a", 8)
    fit_run(tmp_path / "b", 4)
    gn.manual_seed(99)
    resumed, opt = fit_run(tmp_path / "b", 8, resume=True, groups=False)  # the groups come from the checkpoint
    assert opt.groups == {"6.*": {"lr": 0.002, "weight_decay": 0.1}}
    for key, value in straight.state_dict().items():
        numpy.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)
    loaded = gn.load(gn.save(straight, tmp_path / "m.safetensors"))  # the frozen flag travels in the architecture
    assert [layer.frozen for layer in loaded.layers] == [False, False, False, True, False, False, False]


@pytest.mark.gpu
def test_a_replayed_graph_reads_each_group_rate():
    from tests.test_cuda_graph import assert_same

    def run(cuda_graph):
        gn.manual_seed(0)
        model = gn.models.mlp((784, 16, 16, 10)).to("gpu")
        model[2].freeze()
        opt = gn.optim.SGD(model, lr=0.1, momentum=0.9, groups={"0.*": {"lr": 0.01, "momentum": 0.5}})
        said = []
        gn.fit(model, (data(200, 784, 10)), optimizer=opt, steps=6, batch_size=64,
               schedule=gn.optim.CosineLR(opt, t_max=6), progress=False, cuda_graph=cuda_graph, log=said.append)
        return {k: gn.to_numpy(v) for k, v in model.params.items()}, said

    (eager, _), (replayed, said) = run(False), run(True)
    assert said == []
    assert_same(replayed, eager)


# -- refusals, one line each
def test_a_pattern_that_matches_no_parameter_is_one_line():
    model = gn.models.mlp((6, 5, 3))
    with pytest.raises(ValueError) as err:
        gn.optim.SGD(model, lr=0.1, groups={"fc1.*": {"lr": 0.01}})
    assert one_error_line(str(err.value)) == ("SGD: groups['fc1.*']: the pattern matches no parameter of the "
                                              "Sequential (its parameters: 0.weight, 0.bias, 2.weight, 2.bias)")


def test_an_unknown_setting_in_a_group_is_one_line():
    with pytest.raises(ValueError) as err:
        gn.optim.Adam(gn.models.mlp((6, 5, 3)), groups={"0.*": {"momentum": 0.9}})
    assert one_error_line(str(err.value)) == ("Adam: groups['0.*']: unknown setting 'momentum' (a group sets lr "
                                              "or betas, eps, weight_decay)")


@pytest.mark.parametrize("lr", [0, -1.0, float("nan"), "0.1"])
def test_a_bad_lr_in_a_group_is_one_line(lr):
    with pytest.raises(ValueError) as err:
        gn.optim.AdamW(gn.models.mlp((6, 5, 3)), groups={"2.*": {"lr": lr}})
    assert one_error_line(str(err.value)) == f"AdamW: groups['2.*']: lr must be positive and finite, got {lr!r}"


def test_fitting_a_wholly_frozen_model_is_one_line_and_touches_nothing(tmp_path):
    model = gn.models.mlp((6, 5, 3))
    opt = gn.optim.SGD(model, lr=0.1)
    model.freeze()
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as err:
        gn.fit(model, data(), optimizer=opt, steps=2, out_dir=out, progress=False)
    assert one_error_line(str(err.value)) == ("SGD: every parameter of the Sequential is frozen (layer.freeze()), so "
                                              "training would change nothing; unfreeze the layers to train "
                                              "(layer.unfreeze())")
    assert snapshot(tmp_path) == before


@pytest.mark.gpu
@pytest.mark.skipif(not ON_STANDIN, reason="counts launches on the CuPy stand-in")
def test_each_group_costs_one_launch_and_a_frozen_first_layer_saves_its_backward():
    """An Adam step of a 3-layer MLP: 16 launches as one flat group; a group with its own rate is a flat
    group of its own (one more update launch each); a frozen first layer skips its dW/db GEMMs, its bias
    sum, and its update (3 fewer)."""
    from gpunet.backend import to_device
    from tests import gpu_standin
    x, y = data(64, 784, 10)

    def launches(groups=None, freeze=False):
        model = gn.models.mlp((784, 32, 32, 10)).to("gpu")
        if freeze:
            model[0].freeze()
        opt = gn.optim.Adam(model, lr=1e-3, groups=groups)
        xb, yb = to_device(x, "gpu"), to_device(y, "gpu")

        def step():
            _, grad = gn.losses.softmax_cross_entropy(model.forward(xb), yb)
            model.backward_params(grad)
            opt.step()

        step(), step()
        with gpu_standin.counting() as counts:
            step()
        assert counts["d2h"] == 0 and counts["h2d"] == 0, counts
        return counts["launches"]

    plain = launches()
    assert launches({"4.*": {"lr": 1e-4}}) == plain + 1
    assert launches({"4.*": {"lr": 1e-4}, "2.*": {"lr": 1e-5}}) == plain + 2
    assert launches(freeze=True) == plain - 3


@pytest.mark.parametrize("frozen", [0, 3])
def test_a_frozen_conv_layer_passes_the_gradient_on_and_keeps_its_weights(frozen):
    """LeNet with its first convolution frozen (no backward runs for it: nothing before it trains) or its
    second (its input gradient still flows to the first, its own dW is computed and discarded)."""
    x = rng(0).random((8, 1, 28, 28), dtype=numpy.float32)
    y = rng(1).integers(0, 10, 8)
    models = [gn.models.lenet(), gn.models.lenet()]
    models[1].load_state_dict(models[0].state_dict())
    models[1][frozen].freeze()
    for model in models:
        _, grad = gn.losses.softmax_cross_entropy(model.forward(x), y)
        model.backward_params(grad)
    trained, with_frozen = models
    for key in trained.params:
        if not key.startswith(f"{frozen}."):
            numpy.testing.assert_allclose(with_frozen.grads[key], trained.grads[key], rtol=1e-6, atol=1e-9,
                                          err_msg=key)
    if frozen == 0:
        assert not with_frozen.grads["0.weight"].any()
    before = {k: v.copy() for k, v in with_frozen.params.items()}
    gn.optim.SGD(with_frozen, lr=0.1, momentum=0.9).step()
    for key in (f"{frozen}.weight", f"{frozen}.bias"):
        numpy.testing.assert_array_equal(with_frozen.params[key], before[key], err_msg=key)
    assert not numpy.array_equal(with_frozen.params["11.weight"], before["11.weight"])
