"""One training step of the same model in gpunet and in PyTorch, as zero-argument callables.

Both sides get the same weights, the same batch, the same optimizer and the same device ("cpu"
or "gpu"), so their first losses agree (checked by `first_losses`) before anything is timed.
"""
from __future__ import annotations

import numpy

import gpunet as gn
from gpunet.backend import ops_for, to_device
from gpunet.benchmarks.twins import import_torch as _torch
from gpunet.benchmarks.twins import torch_twin


def torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


def gpunet_step(model, x, y, optimizer, loss="softmax_cross_entropy"):
    loss_fn = gn.losses.LOSSES[loss]

    def step():
        value, grad = loss_fn(model.forward(x), y)
        model.backward(grad, input_grad=False)
        optimizer.step()
        return value
    return step


def torch_step(module, x, y, optimizer, loss="softmax_cross_entropy", device="cpu"):
    torch = _torch()
    tx, ty = (torch.from_numpy(a).to(torch_device(device)) for a in (x, y))
    functional = torch.nn.functional
    loss_fn = {"softmax_cross_entropy": lambda out, t: functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                                                t.reshape(-1)),
               "mse": functional.mse_loss}[loss]

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = loss_fn(module(tx), ty)
        value.backward()
        optimizer.step()
        return value
    return step


def model_steps(model, x, y, optimizer="sgd", loss="softmax_cross_entropy", device="cpu"):
    """(gpunet step, torch step) for the same model and host batch x, y on `device`:
    SGD with momentum (lr 0.01, 0.9) or Adam (lr 1e-3)."""
    torch = _torch()
    twin = torch_twin(model).to(torch_device(device))
    model.to(device)
    if optimizer == "sgd":
        ours_opt, their_opt = gn.optim.SGD(model, lr=0.01, momentum=0.9), torch.optim.SGD(twin.parameters(), lr=0.01,
                                                                                           momentum=0.9)
    else:
        ours_opt, their_opt = gn.optim.Adam(model, lr=1e-3), torch.optim.Adam(twin.parameters(), lr=1e-3)
    ours = gpunet_step(model, to_device(x, device), to_device(y, device), ours_opt, loss)
    return ours, torch_step(twin, x, y, their_opt, loss, device)


def mlp_steps(batch=128, sizes=(784, 300, 100, 10), device="cpu", seed=0):
    """The 784-300-100-10 MLP, SGD with momentum."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((batch, sizes[0])).astype("float32")
    return model_steps(gn.models.mlp(sizes), x, r.integers(0, sizes[-1], batch), device=device)


def lenet_steps(batch=64, device="cpu", seed=0):
    """LeNet-5 on 28x28 images, SGD with momentum."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((batch, 1, 28, 28)).astype("float32")
    return model_steps(gn.models.lenet(), x, r.integers(0, 10, batch), device=device)


def lstm_lm_steps(batch=32, context=64, embedding=64, hidden=256, vocab=65, device="cpu", seed=0):
    """The character LSTM language model (embedding, LSTM, Dense head), Adam."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    model = gn.models.char_rnn(vocab, embedding, hidden)
    ids = r.integers(0, vocab, (2, batch, context))
    return model_steps(model, ids[0], ids[1], "adam", device=device)


def attention_block_steps(batch=16, context=128, d_model=256, heads=4, device="cpu", seed=0):
    """One causal pre-LN transformer block (attention + 4x GELU MLP) on float inputs, MSE loss, Adam."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    model = gn.Sequential(gn.layers.TransformerBlock(d_model, heads, causal=True))
    x = r.standard_normal((2, batch, context, d_model)).astype("float32")
    return model_steps(model, x[0], x[1], "adam", loss="mse", device=device)


def transformer_steps(batch=16, context=128, d_model=256, heads=4, layers=2, vocab=65, device="cpu", seed=0):
    """The decoder-only character transformer, Adam."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    model = gn.models.transformer(vocab, context, d_model, heads, layers)
    ids = r.integers(0, vocab, (2, batch, context))
    return model_steps(model, ids[0], ids[1], "adam", device=device)


def conv_steps(batch, channels, out_channels, size, kernel, padding, device="cpu", seed=0):
    """Conv2D forward + backward alone (a sum as the loss), the shape given."""
    torch = _torch()
    gn.manual_seed(seed)
    layer = gn.layers.Conv2D(channels, out_channels, kernel, padding=padding)
    x = numpy.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype("float32")
    twin = torch.nn.Conv2d(channels, out_channels, kernel, padding=padding)
    twin.load_state_dict({k: torch.from_numpy(numpy.array(v)) for k, v in layer.state_dict().items()})
    twin.to(torch_device(device))
    layer.to(device)
    gx = to_device(x, device)
    tx = torch.from_numpy(x).to(torch_device(device)).requires_grad_(True)

    def ours():
        y = layer.forward(gx)
        layer.backward(ops_for(y).xp.ones_like(y))
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
