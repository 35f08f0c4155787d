"""Helpers that compare gpunet with its references (PyTorch) and train the default recipes."""
from __future__ import annotations

import numpy
import torch

import gpunet as gn
from tests.support.arrays import on, rng


def run_both(layer, module, x, device, *, rtol=1e-4, atol=1e-5, grad_atol=1e-5, seed=2):
    """One forward and backward through layer (on device) and its torch twin (on the CPU), from
    the same x and upstream gradient; asserts outputs, input and parameter gradients agree."""
    layer.to(device)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = module(tx)
    dy = rng(seed).standard_normal(ty.shape).astype("float32")
    ty.backward(torch.from_numpy(dy))
    y = layer.forward(on(device, x))
    dx = layer.backward(on(device, dy))
    numpy.testing.assert_allclose(gn.to_numpy(y), ty.detach().numpy(), rtol=rtol, atol=atol)
    numpy.testing.assert_allclose(gn.to_numpy(dx), tx.grad.numpy(), rtol=1e-4, atol=atol)
    for name, p in module.named_parameters():
        numpy.testing.assert_allclose(gn.to_numpy(layer.grads[name]), p.grad.numpy(), rtol=1e-4, atol=grad_atol,
                                      err_msg=name)


def assert_matches_torch(y, dx, grads, ty, tx, module, *, strip=0, rtol=1e-4, atol=1e-5):
    """A gpunet forward/backward (output y, input gradient dx, parameter grads) against torch's:
    output ty, input tx.grad and the .grad of module's parameters (names minus `strip` characters)."""
    numpy.testing.assert_allclose(gn.to_numpy(y), ty.detach().numpy(), rtol=rtol, atol=atol)
    numpy.testing.assert_allclose(gn.to_numpy(dx), tx.grad.numpy(), rtol=rtol, atol=atol)
    for name, p in module.named_parameters():
        numpy.testing.assert_allclose(gn.to_numpy(grads[name[strip:]]), p.grad.numpy(), rtol=rtol, atol=atol,
                                      err_msg=name)


def compare_with_torch(layer, module, x, device):
    """run_both after nudging the layer's parameters off their initial values (copied to module)."""
    if layer.params:
        for name, value in layer.params.items():
            value[...] = value + rng(3).uniform(-0.3, 0.3, value.shape).astype("float32")
        module.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in layer.state_dict().items()})
    run_both(layer, module, x, device, atol=1e-4, grad_atol=1e-3, seed=4)


def recipe_accuracy_on_held_out_fifth(name: str, epochs: int) -> float:
    """Train the CLI's default recipe for `name` on 80% of the embedded sample; accuracy on the rest."""
    from gpunet.data import image_preprocess, load_mnist_sample, split
    from gpunet.recipes import recipe
    from gpunet.train import ArrayData
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
