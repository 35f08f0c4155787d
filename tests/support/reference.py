"""Helpers that compare gpunet with its references (PyTorch) and train the default recipes."""
from __future__ import annotations

import numpy
import torch

import gpunet as gn
from tests.support.arrays import on, rng
from tests.support.tolerance import assert_within, layer_atol


def run_both(layer, module, x, device, *, seed=2):
    """One forward and backward through layer (on device) and its torch twin (on the CPU), from
    the same x and upstream gradient; asserts outputs, input and parameter gradients agree within
    the bound of the sums one step of the layer runs (tests/support/tolerance.py's layer_atol)."""
    layer.to(device)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = module(tx)
    dy = rng(seed).standard_normal(ty.shape).astype("float32")
    ty.backward(torch.from_numpy(dy))
    y = layer.forward(on(device, x))
    dx = layer.backward(on(device, dy))
    assert_matches_torch(y, dx, layer.grads, ty, tx, module, layer=layer, input_shape=x.shape)


def assert_matches_torch(y, dx, grads, ty, tx, module, *, layer, input_shape, strip=0):
    """A gpunet forward/backward (output y, input gradient dx, parameter grads) against torch's:
    output ty, input tx.grad and the .grad of module's parameters (names minus `strip` characters).
    Each array within layer_atol: the sums along the layer's forward and backward (counted as
    gpunet.parity_bound counts them for a training step) times the array's largest value."""
    assert_within(gn.to_numpy(y), ty.detach().numpy(), layer_atol(layer, input_shape, ty.detach().numpy()), "output")
    assert_within(gn.to_numpy(dx), tx.grad.numpy(), layer_atol(layer, input_shape, tx.grad.numpy()), "input gradient")
    for name, p in module.named_parameters():
        want = p.grad.numpy()
        assert_within(gn.to_numpy(grads[name[strip:]]), want, layer_atol(layer, input_shape, want),
                      f"gradient of {name}")


def compare_with_torch(layer, module, x, device):
    """run_both after nudging the layer's parameters off their initial values (copied to module)."""
    if layer.params:
        for name, value in layer.params.items():
            value[...] = value + rng(3).uniform(-0.3, 0.3, value.shape).astype("float32")
        module.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in layer.state_dict().items()})
    run_both(layer, module, x, device, seed=4)


def recipe_accuracy_on_held_out_fifth(name: str, epochs: int) -> float:
    """Train the CLI's default recipe for `name` on 80% of the embedded sample; accuracy on the rest."""
    from gpunet.data import image_preprocess, load_mnist_sample, split
    from gpunet.recipes import recipe
    from gpunet.training.train import ArrayData
    r = recipe(name)
    x, y = load_mnist_sample()
    xt, yt, xv, yv = split(x, y, 0.2, seed=0)
    gn.manual_seed(0)
    model = r.build(gn.data.Dataset("mnist-sample", xt, yt, xv, yv, 10))
    model.preprocess = image_preprocess(xt, r.input_shape)
    opt = gn.optim.Adam(model, lr=r.lr)
    gn.fit(model, ArrayData(xt, yt, shift=r.shift), optimizer=opt, epochs=epochs, batch_size=r.batch_size,
           schedule=gn.optim.CosineLR(opt, epochs * -(-len(xt) // r.batch_size)), progress=False)
    return gn.evaluate(model, xv, yv.astype("int64"))["accuracy"]
