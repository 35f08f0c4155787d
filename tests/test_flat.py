"""Flat parameter buffers (gpunet.layers.flat): params and grads are views of one buffer per
device and dtype, kept valid across .to() and load_state_dict; the optimizers update all of them
in one launch, and clip_grad_norm reduces and scales on the device without a host read."""
from __future__ import annotations

import numpy
import pytest

import gpunet as gn
from gpunet.layers.flat import ALIGN, flat_parameters
from tests import gpu_standin
from tests.support.arrays import ON_STANDIN, on, rng


def train_steps(model, opt, device, steps, seed=0, clip=None):
    for step in range(steps):
        x = rng(seed + step).standard_normal((8, 6)).astype("float32")
        y = rng(seed + 100 + step).integers(0, 3, 8)
        _, grad = gn.losses.softmax_cross_entropy(model.forward(on(device, x)), on(device, y))
        model.backward(grad)
        if clip:
            gn.optim.clip_grad_norm(model, clip)
        opt.step()


def host(model):
    return {k: gn.to_numpy(v).copy() for k, v in model.params.items()}


def test_params_and_grads_are_views_of_one_buffer(device):
    model = gn.models.mlp((6, 5, 3)).to(device)
    names, before = list(model.params), host(model)
    gn.optim.Adam(model, lr=0.01)  # an optimizer flattens the model it is given
    flat = flat_parameters(model)
    assert list(model.params) == names == list(model.grads) and len(flat.groups) == 1
    group = flat.groups[0]
    assert group.names == tuple(names) and all(o % ALIGN == 0 for o in group.offsets)
    for name, value in before.items():  # same values, same shapes
        numpy.testing.assert_array_equal(gn.to_numpy(model.params[name]), value)
    for i, name in enumerate(names):  # writing through a view writes the buffer, and the other way round
        model.params[name][...] = i + 1
        model.grads[name][...] = -(i + 1)
        size = model.params[name].size
        chunk = slice(group.offsets[i], group.offsets[i] + size)
        assert (gn.to_numpy(group.param[chunk]) == i + 1).all() and (gn.to_numpy(group.grad[chunk]) == -(i + 1)).all()
    group.param[...] = 0
    assert all((gn.to_numpy(p) == 0).all() for p in model.params.values())
    assert flat_parameters(model) is flat  # still current: nothing rebuilt


@pytest.mark.parametrize("make", ["sgd", "adam"])
def test_views_follow_to_and_load_state_dict_and_the_state_is_kept(device, make):
    """A model moved, or loaded, after the optimizer was made trains exactly as one that was not."""
    def optimizer(model):
        return (gn.optim.SGD(model, lr=0.05, momentum=0.9) if make == "sgd" else gn.optim.Adam(model, lr=0.01))

    straight = gn.models.mlp((6, 5, 3))
    moved = gn.models.mlp((6, 5, 3))
    moved.load_state_dict(straight.state_dict())
    straight.to(device)
    opt_a, opt_b = optimizer(straight), optimizer(moved)  # moved: flattened on the CPU, then moved
    moved.to(device)
    train_steps(straight, opt_a, device, 3)
    train_steps(moved, opt_b, device, 3)
    moved.load_state_dict({k: v.copy() for k, v in host(moved).items()})  # same values, new arrays
    train_steps(straight, opt_a, device, 3, seed=7)
    train_steps(moved, opt_b, device, 3, seed=7)
    flat = flat_parameters(moved)
    assert flat.current(moved) and flat.groups[0].device == device
    trained = host(moved)
    for i, name in enumerate(flat.groups[0].names):  # the loaded arrays are views of the new buffer
        moved.params[name][...] = 5
        assert (gn.to_numpy(flat.groups[0].view(flat.groups[0].param, i)) == 5).all()
        moved.params[name][...] = on(device, trained[name])
    # the same ops on the same device and data on both sides (the same bits on the CPU); a state lost in
    # the move shows as a learning-rate-sized difference, 1e5 times these tolerances
    for name, value in host(straight).items():
        numpy.testing.assert_allclose(host(moved)[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    slot = "momentum_buffer" if make == "sgd" else "exp_avg"
    for name in straight.params:
        numpy.testing.assert_allclose(gn.to_numpy(opt_b.state[name][slot]), gn.to_numpy(opt_a.state[name][slot]),
                                      rtol=1e-6, atol=1e-7)


def test_optimizer_state_views_and_checkpoint_names():
    model = gn.models.mlp((6, 5, 3))
    opt = gn.optim.AdamW(model, lr=0.01)
    train_steps(model, opt, "cpu", 2)
    arrays, _ = opt.state_dict()
    assert sorted(arrays) == sorted(f"{n}/{s}" for n in model.params for s in ("exp_avg", "exp_avg_sq"))
    for name, p in model.params.items():
        assert arrays[f"{name}/exp_avg"].shape == p.shape
    buffer = opt._buffers[1][0]["exp_avg"]
    buffer[...] = 3
    assert all((opt.state[n]["exp_avg"] == 3).all() for n in model.params)


def test_sgd_with_momentum_for_some_parameters_only_starts_the_others_as_torch(device):
    """A state_dict holding some momentum buffers: the others take their first step as new ones
    (one update per parameter, on views of the flat buffers: on the GPU, n-d views)."""
    def run(partial):
        model = gn.models.mlp((6, 5, 3))
        model.load_state_dict({k: numpy.full(v.shape, 0.1, "float32") for k, v in model.state_dict().items()})
        model.to(device)
        opt = gn.optim.SGD(model, lr=0.1, momentum=0.9, dampening=0.5)
        if partial:
            opt.load_state_dict({"0.weight/momentum_buffer": numpy.ones((5, 6), "float32")},
                                {"step": 0, "lr": 0.1})
        for g in model.grads.values():
            g[...] = 1.0
        opt.step()
        return host(model)
    fresh, partial = run(False), run(True)
    numpy.testing.assert_allclose(fresh["0.bias"], 0.1 - 0.1 * 1.0)  # first step: the velocity is the gradient
    numpy.testing.assert_allclose(partial["0.bias"], fresh["0.bias"])
    numpy.testing.assert_allclose(partial["0.weight"], 0.1 - 0.1 * (0.9 * 1.0 + 0.5 * 1.0))


def test_clip_grad_norm_over_the_flat_buffer(device):
    model = gn.models.mlp((6, 5, 3)).to(device)
    flat = flat_parameters(model)
    grads = {k: rng(i).standard_normal(g.shape).astype("float32") for i, (k, g) in enumerate(model.grads.items())}
    for k, g in grads.items():
        model.grads[k][...] = on(device, g)
    want = numpy.sqrt(sum(float((g.astype("float64") ** 2).sum()) for g in grads.values()))
    norm = gn.optim.clip_grad_norm(model, 0.5)
    assert norm.shape == () and float(norm) == pytest.approx(want, rel=1e-12)
    for k, g in grads.items():
        # one scale (float64 norm, rounded to float32) times each gradient: 2 roundings, and 1e-6 is 16 u
        numpy.testing.assert_allclose(gn.to_numpy(model.grads[k]), g * (0.5 / (want + 1e-6)), rtol=1e-6)
    assert float(gn.optim.clip_grad_norm(model, 10.0)) == pytest.approx(0.5, rel=1e-5)  # under max_norm: unchanged
    assert flat_parameters(model) is flat


OPTIMIZERS = {"adam": lambda m: gn.optim.Adam(m, lr=1e-3), "adamw": lambda m: gn.optim.AdamW(m, lr=1e-3),
              "sgd": lambda m: gn.optim.SGD(m, lr=0.1),
              "sgd_momentum": lambda m: gn.optim.SGD(m, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_STANDIN, reason="counts launches on the CuPy stand-in")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_optimizer_step_is_one_launch_and_clipping_two_more(name):
    model = gn.models.mlp((784, 300, 100, 10)).to("gpu")
    opt = OPTIMIZERS[name](model)
    for g in model.grads.values():
        g[...] = 1e-3
    opt.step()  # the first step makes the state buffers
    with gpu_standin.counting() as step:
        opt.step()
    assert (step["raw_launches"], step["launches"], step["d2h"], step["h2d"]) == (1, 1, 0, 0)
    with gpu_standin.counting() as clipped:
        norm = gn.optim.clip_grad_norm(model, 0.01)
        opt.step()
    assert clipped["launches"] - step["launches"] <= 2 and clipped["d2h"] == 0 and clipped["h2d"] == 0
    count = sum(p.size for p in model.params.values())
    assert float(norm) == pytest.approx(1e-3 * count**0.5, rel=1e-6)  # squares summed in float64 on every backend


def test_a_copied_model_gets_buffers_of_its_own():
    import copy

    model = gn.models.mlp((6, 5, 3))
    opt = gn.optim.SGD(model, lr=0.1)
    train_steps(model, opt, "cpu", 1)
    twin = copy.deepcopy(model)
    twin_opt = gn.optim.SGD(twin, lr=0.1)
    train_steps(twin, twin_opt, "cpu", 2, seed=3)
    train_steps(model, opt, "cpu", 2, seed=3)
    assert flat_parameters(twin).current(twin) and flat_parameters(twin) is not flat_parameters(model)
    for name, value in host(model).items():
        numpy.testing.assert_array_equal(host(twin)[name], value)
