"""One training step of the same model in gpunet and in PyTorch, as zero-argument callables.

Both sides get the same weights, the same batch and the same optimizer, so their first losses
agree (checked by `first_losses`) before anything is timed.
"""
from __future__ import annotations

import numpy

import gpunet as gn


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError("PyTorch is not installed (pip install -e '.[test]' brings torch==2.13.0)") from exc
    return torch


def mlp_setup(batch=128, sizes=(784, 300, 100, 10), seed=0):
    gn.manual_seed(seed)
    model = gn.models.mlp(sizes)
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((batch, sizes[0])).astype("float32")
    y = r.integers(0, sizes[-1], batch)
    return model, x, y


def gpunet_step(model, x, y, optimizer):
    def step():
        loss, grad = gn.losses.softmax_cross_entropy(model.forward(x), y)
        model.backward(grad, input_grad=False)
        optimizer.step()
        return loss
    return step


def torch_step(module, x, y, optimizer):
    torch = _torch()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(module(tx), ty)
        loss.backward()
        optimizer.step()
        return loss
    return step


def torch_mlp(model):
    """The PyTorch twin of a gn.models.mlp without dropout or batch norm, with the same weights."""
    torch = _torch()
    layers = []
    for layer in model.layers:
        if isinstance(layer, gn.layers.Dense):
            layers.append(torch.nn.Linear(layer.config["in_features"], layer.config["out_features"]))
        else:
            layers.append(torch.nn.ReLU())
    twin = torch.nn.Sequential(*layers)
    twin.load_state_dict({k: torch.from_numpy(numpy.array(gn.to_numpy(v))) for k, v in model.state_dict().items()})
    return twin


def mlp_steps(batch=128, lr=0.01, momentum=0.9):
    """(gpunet step, torch step) for the 784-300-100-10 MLP with SGD + momentum."""
    torch = _torch()
    model, x, y = mlp_setup(batch)
    twin = torch_mlp(model)
    ours = gpunet_step(model, x, y, gn.optim.SGD(model, lr=lr, momentum=momentum))
    theirs = torch_step(twin, x, y, torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum))
    return ours, theirs


def first_losses(ours, theirs, n=3):
    """The first n losses of both steps (they must agree before timing means anything)."""
    return [(float(ours()), float(theirs().detach())) for _ in range(n)]
