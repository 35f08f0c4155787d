"""One training step of the same model in gpunet and in PyTorch, as zero-argument callables.

Both sides get the same weights, the same batch, the same optimizer and the same device ("cpu"
or "gpu"), so their first losses agree (checked by `first_losses`) before anything is timed.

precision "bf16" or "fp16" (`gpunet bench --precision`): gpunet's step runs inside
gpunet.backend.precision.using(precision), as gn.fit's steps do, and PyTorch's forward and loss inside
torch.autocast(device_type, the matching dtype), on the CPU too (torch 2.13's CPU autocast takes both).
In fp16 both steps scale the loss dynamically, as training does: gpunet's LossScaler through fit's own
update (gpunet.training.loss_scale.update_step), PyTorch's torch.amp.GradScaler; bf16 and fp32 have no
scaler on either side.
"""
from __future__ import annotations

import types

import numpy

import gpunet as gn
from gpunet.backend import ops_for, to_device
from gpunet.backend import precision as precisions
from gpunet.benchmarks.twins import import_torch as _torch
from gpunet.benchmarks.twins import torch_twin


def torch_device(device: str) -> str:
    return "cuda" if device == "gpu" else "cpu"


def gpunet_step(model, x, y, optimizer, loss="softmax_cross_entropy", precision="fp32"):
    """One step of model in `precision` (fp16: with fit's dynamic loss scale, attached from step 0)."""
    from gpunet.training import loss_scale

    loss_fn = gn.losses.LOSSES[loss]
    run = types.SimpleNamespace(model=model, optimizer=optimizer, clip_norm=None,
                                scaler=loss_scale.LossScaler() if precision == "fp16" else None)
    if run.scaler is not None:
        run.scaler.attach(model, optimizer, 0)

    def step():
        with precisions.using(precision):
            value, grad = loss_fn(model.forward(x), y)
            model.backward(grad if run.scaler is None else run.scaler.scale(grad), input_grad=False)
            loss_scale.update_step(run)  # (fp16: unscaled and checked, the optimizer's step, the scale's update)
        return value
    return step


# PyTorch's autocast dtype per precision (fp32: no autocast)
AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


class TorchUnsupported(RuntimeError):
    """PyTorch's autocast cannot run a model's step in that precision on that device (torch 2.13's CPU
    autocast in float16 fails in the LSTM: oneDNN has no float16 LSTM primitive there): the row is skipped
    with this reason, nothing timed against a side that does not run."""


def torch_step(module, x, y, optimizer, loss="softmax_cross_entropy", device="cpu", precision="fp32"):
    torch = _torch()
    dtype = getattr(torch, AUTOCAST[precision]) if precision in AUTOCAST else None
    scaler = torch.amp.GradScaler(torch_device(device)) if precision == "fp16" else None
    tx, ty = (torch.from_numpy(a).to(torch_device(device)) for a in (x, y))
    functional = torch.nn.functional
    loss_fn = {"softmax_cross_entropy": lambda out, t: functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                                                t.reshape(-1)),
               "mse": functional.mse_loss}[loss]

    def step():
        optimizer.zero_grad(set_to_none=True)
        if dtype is None:
            value = loss_fn(module(tx), ty)
        else:
            try:
                with torch.autocast(torch_device(device), dtype):
                    value = loss_fn(module(tx), ty)
            except RuntimeError as exc:
                reason = (str(exc).strip().splitlines() or ["no message"])[0].split(". ")[0]
                raise TorchUnsupported(f"PyTorch {torch.__version__}'s {torch_device(device).upper()} autocast in "
                                       f"{AUTOCAST[precision]} fails on this model: {reason}") from None
        if scaler is None:
            value.backward()
            optimizer.step()
        else:
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
        return value
    return step


def model_steps(model, x, y, optimizer="sgd", loss="softmax_cross_entropy", device="cpu", precision="fp32"):
    """(gpunet step, torch step) for the same model and host batch x, y on `device`, in `precision`:
    SGD with momentum (lr 0.01, 0.9) or Adam (lr 1e-3)."""
    torch = _torch()
    twin = torch_twin(model).to(torch_device(device))
    model.to(device)
    if optimizer == "sgd":
        ours_opt, their_opt = gn.optim.SGD(model, lr=0.01, momentum=0.9), torch.optim.SGD(twin.parameters(), lr=0.01,
                                                                                           momentum=0.9)
    else:
        ours_opt, their_opt = gn.optim.Adam(model, lr=1e-3), torch.optim.Adam(twin.parameters(), lr=1e-3)
    ours = gpunet_step(model, to_device(x, device), to_device(y, device), ours_opt, loss, precision)
    return ours, torch_step(twin, x, y, their_opt, loss, device, precision)


def mlp_steps(batch=128, sizes=(784, 300, 100, 10), device="cpu", seed=0, precision="fp32"):
    """The 784-300-100-10 MLP, SGD with momentum."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((batch, sizes[0])).astype("float32")
    return model_steps(gn.models.mlp(sizes), x, r.integers(0, sizes[-1], batch), device=device, precision=precision)


def lenet_steps(batch=64, device="cpu", seed=0, precision="fp32"):
    """LeNet-5 on 28x28 images, SGD with momentum."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    x = r.standard_normal((batch, 1, 28, 28)).astype("float32")
    return model_steps(gn.models.lenet(), x, r.integers(0, 10, batch), device=device, precision=precision)


def lstm_lm_steps(batch=32, context=64, embedding=64, hidden=256, vocab=65, device="cpu", seed=0, precision="fp32"):
    """The character LSTM language model (embedding, LSTM, Dense head), Adam."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    model = gn.models.char_rnn(vocab, embedding, hidden)
    ids = r.integers(0, vocab, (2, batch, context))
    return model_steps(model, ids[0], ids[1], "adam", device=device, precision=precision)


def attention_block_steps(batch=16, context=128, d_model=256, heads=4, device="cpu", seed=0, precision="fp32"):
    """One causal pre-LN transformer block (attention + 4x GELU MLP) on float inputs, MSE loss, Adam."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    model = gn.Sequential(gn.layers.TransformerBlock(d_model, heads, causal=True))
    x = r.standard_normal((2, batch, context, d_model)).astype("float32")
    return model_steps(model, x[0], x[1], "adam", loss="mse", device=device, precision=precision)


def transformer_steps(batch=16, context=128, d_model=256, heads=4, layers=2, vocab=65, device="cpu", seed=0,
                      precision="fp32"):
    """The decoder-only character transformer, Adam."""
    gn.manual_seed(seed)
    r = numpy.random.default_rng(seed)
    model = gn.models.transformer(vocab, context, d_model, heads, layers)
    ids = r.integers(0, vocab, (2, batch, context))
    return model_steps(model, ids[0], ids[1], "adam", device=device, precision=precision)


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
