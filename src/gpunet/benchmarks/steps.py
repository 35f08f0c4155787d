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


def torch_twin(model):
    """The torch.nn.Sequential twin of a gpunet Sequential, carrying the same weights."""
    torch = _torch()
    nn = torch.nn
    makers = {
        "Dense": lambda c: nn.Linear(c["in_features"], c["out_features"], bias=c["bias"]),
        "Conv2D": lambda c: nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"],
                                      c["padding"], bias=c["bias"]),
        "MaxPool2D": lambda c: nn.MaxPool2d(c["kernel_size"], c["stride"]),
        "AvgPool2D": lambda c: nn.AvgPool2d(c["kernel_size"], c["stride"]),
        "BatchNorm1d": lambda c: nn.BatchNorm1d(c["num_features"], c["eps"], c["momentum"]),
        "BatchNorm2d": lambda c: nn.BatchNorm2d(c["num_features"], c["eps"], c["momentum"]),
        "LayerNorm": lambda c: nn.LayerNorm(c["normalized_shape"], c["eps"]),
        "Dropout": lambda c: nn.Dropout(c["p"]), "Flatten": lambda c: nn.Flatten(c["start_dim"]),
        "ReLU": lambda c: nn.ReLU(), "Tanh": lambda c: nn.Tanh(), "Sigmoid": lambda c: nn.Sigmoid(),
        "GELU": lambda c: nn.GELU(c["approximate"]),
    }
    twin = nn.Sequential(*(makers[type(layer).__name__](layer.config) for layer in model.layers))
    twin.load_state_dict({k: torch.from_numpy(numpy.array(gn.to_numpy(v))) for k, v in model.state_dict().items()})
    return twin


def classifier_steps(model, x, y, lr=0.01, momentum=0.9):
    """(gpunet step, torch step) for the same classifier, batch and SGD with momentum."""
    torch = _torch()
    twin = torch_twin(model)
    ours = gpunet_step(model, x, y, gn.optim.SGD(model, lr=lr, momentum=momentum))
    theirs = torch_step(twin, x, y, torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum))
    return ours, theirs


def mlp_steps(batch=128):
    """The 784-300-100-10 MLP, batch 128, SGD with momentum."""
    return classifier_steps(*mlp_setup(batch))


def lenet_steps(batch=64, seed=0):
    """LeNet-5 on 28x28 images, batch 64, SGD with momentum."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((batch, 1, 28, 28)).astype("float32")
    return classifier_steps(gn.models.lenet(), x, r.integers(0, 10, batch))


def conv_steps(batch, channels, out_channels, size, kernel, padding, seed=0):
    """Conv2D forward + backward alone (a sum as the loss), the shape given."""
    torch = _torch()
    gn.manual_seed(seed)
    layer = gn.layers.Conv2D(channels, out_channels, kernel, padding=padding)
    x = numpy.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype("float32")
    twin = torch.nn.Conv2d(channels, out_channels, kernel, padding=padding)
    twin.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in layer.state_dict().items()})
    tx = torch.from_numpy(x).requires_grad_(True)

    def ours():
        y = layer.forward(x)
        layer.backward(numpy.ones_like(y))
        return y.sum()

    def theirs():
        twin.zero_grad(set_to_none=True)
        tx.grad = None
        y = twin(tx)
        y.backward(torch.ones_like(y))
        return y.sum().detach()
    return ours, theirs


def first_losses(ours, theirs, n=3):
    """The first n losses of both steps (they must agree before timing means anything)."""
    return [(float(ours()), float(theirs().detach())) for _ in range(n)]
