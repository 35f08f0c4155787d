"""`gpunet parity`: the same seeded training run on two devices, compared layer by layer.

Both runs start from the same weights, see the same batches and draw the same dropout masks
(masks come from the host generator, reseeded identically before each step on each device), so
any difference comes from the arithmetic of the two backends.
"""
from __future__ import annotations

import numpy

import gpunet as gn
from gpunet.backend import to_device, to_numpy
from gpunet.data import CharWindows, image_preprocess, load_dataset, text_preprocess
from gpunet.data.pipeline import apply_preprocess
from gpunet.recipes import recipe


def relative_difference(a, b) -> float:
    a, b = to_numpy(a).astype("float64"), to_numpy(b).astype("float64")
    return float(numpy.abs(a - b).max() / max(numpy.abs(b).max(), 1e-12)) if a.size else 0.0


def model_and_batches(name: str, steps: int, batch_size: int | None, seed: int):
    """The recipe's model (built with `seed`) and `steps` training batches of its default dataset."""
    r = recipe(name)
    ds = load_dataset(r.dataset, seed=seed)
    gn.manual_seed(seed)
    model = r.build(ds)
    batch = batch_size or r.batch_size
    rng = numpy.random.default_rng(seed)
    if r.kind == "text":
        model.preprocess = text_preprocess(ds.vocabulary)
        source = CharWindows(ds.train, r.context)
        data = [source.get(numpy.arange(batch), rng) for _ in range(steps)]
    else:
        model.preprocess = image_preprocess(ds.x_train, r.input_shape)
        idx = [rng.choice(len(ds.x_train), batch, replace=False) for _ in range(steps)]
        data = [(ds.x_train[i], ds.y_train[i].astype("int64")) for i in idx]
    return model, data, r


def run(model, data, device: str, lr: float, seed: int):
    """Train a copy of model on device; per step: loss, activations and gradients per layer."""
    model = _copy(model).to(device)
    optimizer = gn.optim.Adam(model, lr=lr)
    xp = gn.backend.ops_for_device(device).xp
    record = []
    for step, (x, y) in enumerate(data):
        gn.manual_seed(seed + step)
        out = apply_preprocess(model.preprocess, to_device(x, device), xp)
        activations = []
        for layer in model.layers:
            out = layer.forward(out)
            activations.append(to_numpy(out))
        loss, grad = gn.losses.softmax_cross_entropy(out, to_device(y, device))
        model.backward(grad, input_grad=False)
        grads = {k: to_numpy(v) for k, v in model.grads.items()}
        optimizer.step()
        record.append((float(loss), activations, grads))
    return record


def compare(name: str, steps: int = 20, devices=("cpu", "gpu"), batch_size: int | None = None, seed: int = 0) -> dict:
    model, data, r = model_and_batches(name, steps, batch_size, seed)
    first, second = (run(model, data, device, r.lr, seed) for device in devices)
    layers = [f"{i}: {layer.describe()}" for i, layer in enumerate(model.layers)]
    activation_diff = [max(relative_difference(b[1][i], a[1][i]) for a, b in zip(first, second))
                       for i in range(len(layers))]
    grad_diff = {k: max(relative_difference(b[2][k], a[2][k]) for a, b in zip(first, second)) for k in first[0][2]}
    return {"model": name, "devices": list(devices), "layers": layers, "activation_diff": activation_diff,
            "grad_diff": grad_diff, "losses": [[a[0], b[0]] for a, b in zip(first, second)]}


def format_report(report: dict) -> str:
    a, b = report["devices"]
    lines = [f"parity of {report['model']}: {a} vs {b}, {len(report['losses'])} steps (largest relative "
             f"difference over all steps)", "", "layer activations:"]
    lines += [f"  {name:<60} {diff:.2e}" for name, diff in zip(report["layers"], report["activation_diff"])]
    lines += ["", "parameter gradients:"]
    lines += [f"  {name:<60} {diff:.2e}" for name, diff in report["grad_diff"].items()]
    lines += ["", f"{'step':>5}  {'loss on ' + a:>14}  {'loss on ' + b:>14}  relative difference"]
    for step, (x, y) in enumerate(report["losses"], 1):
        lines.append(f"{step:>5}  {x:>14.6f}  {y:>14.6f}  {abs(x - y) / max(abs(x), 1e-12):.2e}")
    return "\n".join(lines)


def _copy(model):
    """A model of the same architecture and weights (through the checkpoint's description)."""
    from gpunet.layers import build_layer

    twin = build_layer(model.to_config())
    twin.load_state_dict({k: to_numpy(v) for k, v in model.state_dict().items()})
    twin.preprocess = model.preprocess
    return twin
