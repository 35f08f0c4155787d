"""`gpunet parity`: the same seeded training run on two devices, compared layer by layer and step
by step.

Both runs start from the same weights, see the same batches and apply the same dropout masks
(counter-based: a function of the seed, the step, the layer and the element, computed on each
device, see gpunet.random), so any difference comes from the arithmetic of the two backends.

A Sequential is compared per layer, each layer's forward run alone; a gn.Model per node of its graph,
each node's layer run alone (the model's fused chains unfused, as a Sequential's), a row per node named
by the layer's name in the model, a shared layer's later calls "head#2", "head#3". The command line
trains a recipe (gpunet train's --model); compare() also takes a model and its batches.

With precision="bf16" or "fp16" the two runs are one device's: the same steps in fp32 and in that mixed
precision, in lockstep, each step's differences held to gpunet.parity_bound.precision_bound. In fp16 the
mixed side scales its loss as gn.fit does (gpunet.training.loss_scale); a step whose scaled gradients
overflow is skipped by both sides, and listed.
"""
from __future__ import annotations

import numpy

import gpunet as gn
from gpunet.backend import to_device, to_numpy
from gpunet.data import CharWindows, image_preprocess, load_dataset, text_preprocess
from gpunet.data.pipeline import apply_preprocess
from gpunet.layers import Dropout, Layer, Model, Sequential, build_layer
from gpunet.backend import precision as precisions
from gpunet import parity_precision as mixed_report
from gpunet.parity_bound import UNIT_16, step_bound
from gpunet.recipes import recipe
from gpunet.training import loss_scale


def relative_difference(a, b, floor: float = 1e-12) -> float:
    """The largest absolute difference over the largest magnitude of b (or floor, if larger)."""
    a, b = to_numpy(a).astype("float64"), to_numpy(b).astype("float64")
    return float(numpy.abs(a - b).max() / max(numpy.abs(b).max(), floor)) if a.size else 0.0


def _gradient_differences(first: dict, second: dict) -> dict:
    """Per parameter, relative_difference on the scale of at least 1% of the step's largest gradient:
    a gradient that is exactly 0 in exact arithmetic (a bias before a batch norm) holds only
    rounding noise, which measured against itself would read as a 100% difference."""
    scale = max((float(numpy.abs(to_numpy(g)).max()) for g in first.values() if g.size), default=0.0)
    return {k: relative_difference(second[k], first[k], max(1e-2 * scale, 1e-12)) for k in first}


def model_and_batches(name: str, steps: int, batch_size: int | None, seed: int, dropout: float | None = None):
    """The recipe's model (built with `seed`; see with_dropout) and `steps` training batches of its
    default dataset."""
    r = recipe(name)
    ds = load_dataset(r.dataset, seed=seed)
    gn.manual_seed(seed)
    model = r.build(ds)
    if dropout is not None:
        model = with_dropout(model, dropout)
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


def with_dropout(model: Layer, p: float) -> Layer:
    """The model with dropout rate p, and the same weights and parameter names.

    Every dropout the model has (Dropout layers, a `dropout` argument such as TransformerBlock's)
    gets rate p. A model with none gets one Dropout on its output (on each output of a gn.Model), appended
    so that no layer index, and so no PyTorch-style parameter name ("3.weight"), moves.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    config = model.to_config()
    if not _set_dropout(config, p):
        if config["type"] == "Model":
            _drop_outputs(config, p)
        else:
            config["layers"].append(Dropout(p).to_config())
    return _rebuild(config, model)


def _drop_outputs(config: dict, p: float) -> None:
    """A Dropout node on each output of a gn.Model's description, under a name the model does not use."""
    taken = {name for name, _ in config["layers"]}
    slots = len(config["inputs"]) + sum(node["outputs"] for node in config["nodes"])
    outputs = []
    for s in config["outputs"]:
        name = next(f"output_dropout{'' if k == 0 else f'_{k}'}" for k in range(len(taken) + 1)
                    if f"output_dropout{'' if k == 0 else f'_{k}'}" not in taken)
        taken.add(name)
        config["layers"].append([name, Dropout(p).to_config()])
        config["nodes"].append({"layer": name, "inputs": [s], "many": False, "outputs": 1})
        outputs.append(slots)
        slots += 1
    config["outputs"] = outputs


def _set_dropout(config, p: float) -> bool:
    """Set every dropout rate in a to_config() description to p; False when there is none."""
    found = False
    if isinstance(config, dict):
        args = config.get("args", {})
        if config.get("type") == "Dropout":
            args["p"], found = p, True
        elif "dropout" in args:
            args["dropout"], found = p, True
        for value in config.values():
            found = _set_dropout(value, p) or found
    elif isinstance(config, list):
        for value in config:
            found = _set_dropout(value, p) or found
    return found


class _Side:
    """One device's copy of the model and its Adam, stepped one batch at a time: step (forward, backward),
    then apply (the update). In fp16, with fit's dynamic loss scaler from init_scale (None: fit's 2**16)."""

    def __init__(self, model, device: str, lr: float, precision: str = "fp32", init_scale: float | None = None):
        self.device, self.model, self.precision = device, _copy(model).to(device), precision
        if isinstance(self.model, Model):
            for step in self.model._steps:  # every node alone, as a Sequential's layers run here (see step)
                step.absorbed, step.inside = [], False
        self.optimizer, self.scaler = gn.optim.Adam(self.model, lr=lr), None
        if precision == "fp16":
            self.scaler = loss_scale.LossScaler(loss_scale.INIT_SCALE if init_scale is None else init_scale)
            self.scaler.attach(self.model, self.optimizer, 0)
        self.xp = gn.backend.ops_for_device(device).xp

    def take_state_of(self, other: "_Side") -> None:
        """The other side's parameters and Adam state (moments and step count), bit for bit."""
        self.model.load_state_dict({k: to_numpy(v) for k, v in other.model.state_dict().items()})
        self.optimizer.load_state_dict(*other.optimizer.state_dict())

    def step(self, step: int, x, y):
        """Train on one batch: (loss, activations per layer or node, gradients per parameter), host copies
        taken when each was made (layers and optimizers reuse their buffers in place). A gn.Model's copy
        has no fused chains: its forward runs each node's layer alone and keeps every node's output until
        its backward, so they are copied when the forward is done. The side's precision is the thread's
        for the step (gpunet.backend.precision.using). With a loss scaler the loss gradient is scaled and the
        gradients unscaled before they are copied (inf or NaN where they overflowed: no NumPy warnings)."""
        with precisions.using(self.precision), numpy.errstate(all=None if self.scaler is None else "ignore"):
            return self._step(step, x, y)

    def apply(self, skip: bool = False) -> dict | None:
        """The step's update, unless skip; with a loss scaler the rest of fit's (loss_scale.update_step, after
        step's unscale; parity does not clip): the optimizer's step, skipped on an overflow, and the scale's
        update. Returns the overflow's scale before and after, or None."""
        with precisions.using(self.precision):
            if self.scaler is None:
                if not skip:
                    self.optimizer.step()
                return None
            before, skipped = self.scaler.scale_value, self.scaler.skipped
            self.scaler.step()
            self.scaler.update()
            self.scaler.sync()
            return {"scale_before": before, "scale_after": self.scaler.scale_value} if self.scaler.skipped > skipped \
                else None

    def _step(self, step: int, x, y):
        gn.random.set_step(step)
        moved = [to_device(a, self.device) for a in x] if isinstance(x, (list, tuple)) else to_device(x, self.device)
        out = apply_preprocess(self.model.preprocess, moved, self.xp)
        if isinstance(self.model, Model):
            out = self.model.forward(out)
            values = self.model.saved.values
            activations = [[_host_copy(values[s]) for s in node.outs] for node in self.model._steps]
        else:
            activations = []
            for layer in self.model.layers:
                out = layer.forward(out)
                activations.append(_host_copy(out))
        if isinstance(out, list):  # a gn.Model with several outputs: a softmax cross-entropy each, summed
            parts = [gn.losses.softmax_cross_entropy(o, to_device(t, self.device)) for o, t in zip(out, y, strict=True)]
            loss, grad = sum(gn.losses.item(value) for value, _ in parts), [g for _, g in parts]
        else:
            value, grad = gn.losses.softmax_cross_entropy(out, to_device(y, self.device))
            loss = gn.losses.item(value)
        self.model.backward(grad if self.scaler is None else self.scaler.scale(grad), input_grad=False)
        if self.scaler is not None:
            self.scaler.unscale()
        return loss, activations, {k: _host_copy(v) for k, v in self.model.grads.items()}


def run(model, data, device: str, lr: float, seed: int):
    """Train a copy of model on device; per step: loss, activations and gradients per layer, each
    a host copy taken when it was made."""
    return _run_sides(model, data, (device,), lr, seed, lockstep=False)[0][0]


def _run_sides(model, data, devices, lr: float, seed: int, lockstep: bool, precisions_=("fp32", "fp32"),
               init_scale: float | None = None):
    """(each device's record (see run), the loss scaler's overflows: step, scale before and after). lockstep:
    before every step after the first, each later side takes the first side's parameters and optimizer
    state, so a step's differences are that step's arithmetic alone (not rounding carried and amplified
    from earlier steps). A step a side's loss scaler skips (an overflow) is skipped by every side: its
    update is applied after the scaled side's, and only when that one applied."""
    gn.manual_seed(seed)  # the dropout masks' key
    sides = [_Side(model, device, lr, p, init_scale) for device, p in zip(devices, precisions_)]
    records, overflows = [[] for _ in sides], []
    for step, (x, y) in enumerate(data):
        if lockstep and step:
            for side in sides[1:]:
                side.take_state_of(sides[0])
        for side, record in zip(sides, records):
            record.append(side.step(step, x, y))
        overflow = None
        for side in sorted(sides, key=lambda s: s.scaler is None):  # the scaled side first
            overflow = side.apply(skip=overflow is not None) or overflow
        if overflow:
            overflows.append({"step": step + 1, **overflow})
    return records, overflows


def compare(model, steps: int = 20, devices=None, batch_size: int | None = None, seed: int = 0,
            dropout: float | None = None, lockstep: bool = False, *, data=None, lr: float = 1e-3,
            precision: str = "fp32", init_scale: float | None = None) -> dict:
    """Train `model` on both devices and compare: per layer (per node of a gn.Model) and parameter the
    largest relative difference over all steps (activation_diff, grad_diff), and per step the loss,
    activation and gradient differences (loss_diff, step_activation_diff, step_grad_diff; the latter two
    the largest over layers and parameters). dropout: a rate for every dropout of the model (None:
    its own), see with_dropout. lockstep: the second device starts every step from the first one's
    parameters and optimizer state (see _run_sides): each step's differences are then one step's
    rounding, which an error bound can be derived for; without it, differences of a step include those
    carried from all earlier steps, which Adam amplifies (its update divides by the root of tiny second
    moments).

    model: a recipe's name (gpunet train's --model: its model, dataset, batch size and learning rate,
    seeded by `seed`), or a model (a Sequential, a gn.Model, any layer) with `data`, its training batches
    [(x, y), ...] (the first `steps` of them; x a list of arrays for several inputs, raw if the model has
    `preprocess`; y class ids, a list of them for several outputs: the loss is a softmax cross-entropy
    per output, summed), trained by Adam at `lr`; batch_size is the recipe's only.

    devices: the two devices, ("cpu", "gpu") by default. precision "bf16" or "fp16": one device (devices
    its name twice, ("cpu", "cpu") by default) runs the steps in fp32 and in that mixed precision, in
    lockstep (the mixed side starts every step from the fp32 side's state); the report adds per row the
    bound of gpunet.parity_bound.precision_bound (row_bounds: a Sequential's layer i the forward's products
    up to it, a gn.Model's nodes the whole step's), first_over (the first step, and in it the first layer,
    parameter or the loss, over its bound; None: none), loss_scale (how the mixed side scaled its loss) and
    overflows. fp16's side scales its loss as gn.fit does, from init_scale (None: fit's 2**16; a large one
    forces overflows); each step its scaler skipped is in overflows (step, scale_before, scale_after), skipped
    by the fp32 side too, its gradients not compared (step_grad_diff None); its activations and loss are."""
    precisions.check(precision, "parity.compare")
    if init_scale is not None and (precision != "fp16" or not init_scale > 0):
        raise ValueError(f"parity.compare: init_scale is fp16's starting loss scale, a positive number; got "
                         f"{init_scale!r} with precision {precision!r}")
    mixed = precision != "fp32"
    devices = tuple(devices or (("cpu", "cpu") if mixed else ("cpu", "gpu")))
    if mixed and devices[0] != devices[1]:
        raise ValueError(f"parity.compare: precision {precision!r} compares fp32 with it on one device, got {devices}")
    lockstep = lockstep or mixed
    if isinstance(model, str):
        name = model
        model, data, r = model_and_batches(name, steps, batch_size, seed, dropout)
        lr = r.lr
    else:
        if not isinstance(model, Layer) or data is None:
            raise ValueError("parity.compare: give a recipe's name, or a gpunet model with data=[(x, y), ...], its "
                             f"training batches; got {type(model).__name__}" + (" without data" if data is None else ""))
        name = model.name or type(model).__name__
        if dropout is not None:
            model = with_dropout(model, dropout)
        data = list(data)[:steps]
    (first, second), overflows = _run_sides(model, data, devices, lr, seed, lockstep, ("fp32", precision), init_scale)
    skipped = {o["step"] for o in overflows}
    layers = rows(model)
    inputs = apply_preprocess(getattr(model, "preprocess", None), data[0][0], numpy)
    # per step: [layer or node] -> relative difference of the second device from the first
    activations = [[max(map(relative_difference, y, x), default=0.0) if isinstance(x, list)
                    else relative_difference(y, x) for x, y in zip(a[1], b[1])] for a, b in zip(first, second)]
    fp32_bound = _bound(model, inputs, first[0][1][-1])
    grads = [None if step in skipped else _gradient_differences(a[2], b[2])
             for step, (a, b) in enumerate(zip(first, second), 1)]
    report = {"model": name, "devices": list(devices), "dropout": dropout, "lockstep": lockstep, "layers": layers,
              "graph": isinstance(model, Model),
              "activation_diff": [max(step[i] for step in activations) for i in range(len(layers))],
              "grad_diff": {k: max((step[k] for step in grads if step is not None), default=0.0) for k in first[0][2]},
              "losses": [[a[0], b[0]] for a, b in zip(first, second)],
              "loss_diff": [relative_difference(b[0], a[0]) for a, b in zip(first, second)],
              "step_activation_diff": [max(step) for step in activations],
              "step_grad_diff": [None if step is None else max(step.values(), default=0.0) for step in grads],
              "bound": fp32_bound, "precision": precision}
    if mixed:
        report.update(mixed_report.precision_rows(model, inputs, fp32_bound, UNIT_16[precision], activations,
                                                  grads, report["loss_diff"], layers),
                      loss_scale=mixed_report.loss_scaling(precision, init_scale, overflows), overflows=overflows)
    return report


def rows(model) -> list[str]:
    """The report's rows: "i: layer" per layer of a Sequential; per node of a gn.Model, the layer's name in
    the model ("head", its second call "head#2") and the layer on one line."""
    if not isinstance(model, Model):
        return [f"{i}: {layer.describe()}" for i, layer in enumerate(model.layers)]
    calls: dict[str, int] = {}
    found = []
    for node in model._steps:
        calls[node.name] = calls.get(node.name, 0) + 1
        label = node.name if calls[node.name] == 1 else f"{node.name}#{calls[node.name]}"
        found.append(_fit(f"{label}: {' '.join(model[node.name].describe().split())}"))
    return found


def _fit(row: str, width: int = 60) -> str:
    """A row cut to the report's column (a Sequential's description spans several lines, made one)."""
    return row if len(row) <= width else row[:width - 3] + "..."


def _bound(model, inputs, last) -> float:
    """gpunet.parity_bound.step_bound for the step: a Sequential's layers in order; a gn.Model as one layer
    (every node's sums), with each further output's cross-entropy (its sums) added."""
    if not isinstance(model, Model):
        return step_bound(model.layers, inputs.shape, last.shape[-1])
    shapes = tuple(a.shape for a in inputs) if isinstance(inputs, list) else inputs.shape
    outputs = model.output_shapes((shapes[0] if isinstance(inputs, list) else shapes)[0])
    return step_bound([model], shapes, outputs[0][-1]) + sum(step_bound([], shape, shape[-1]) for shape in outputs[1:])


def format_report(report: dict) -> str:
    if report.get("precision", "fp32") != "fp32":
        return mixed_report.format_precision(report)
    a, b = report["devices"]
    dropout = "" if report.get("dropout") is None else f", dropout {report['dropout']}"
    lockstep = ", in lockstep" if report.get("lockstep") else ""
    lines = [f"parity of {report['model']}: {a} vs {b}, {len(report['losses'])} steps{dropout}{lockstep} (largest "
             f"relative difference over all steps)", "", f"{'node' if report.get('graph') else 'layer'} activations:"]
    lines += [f"  {name:<60} {diff:.2e}" for name, diff in zip(report["layers"], report["activation_diff"])]
    lines += ["", "parameter gradients:"]
    lines += [f"  {name:<60} {diff:.2e}" for name, diff in report["grad_diff"].items()]
    lines += ["", f"{'step':>5}  {'loss on ' + a:>14}  {'loss on ' + b:>14}  {'loss diff':>10}  "
                  f"{'activations':>11}  {'gradients':>10}   (relative differences)"]
    rows = zip(report["losses"], report["loss_diff"], report["step_activation_diff"], report["step_grad_diff"])
    for step, ((x, y), loss, act, grad) in enumerate(rows, 1):
        lines.append(f"{step:>5}  {x:>14.6f}  {y:>14.6f}  {loss:>10.2e}  {act:>11.2e}  {grad:>10.2e}")
    bound = report["bound"]
    if report.get("lockstep"):
        over = [i + 1 for i, row in enumerate(zip(*rows_of(report))) if max(row) > bound]
        verdict = f"steps over it: {over}" if over else "every step within it"
        lines += ["", f"bound on one float32 step's differences: {bound:.2e} (gpunet.parity_bound); {verdict}"]
    else:
        lines += ["", f"(differences carry over from step to step; --lockstep holds each step to the bound "
                      f"{bound:.2e})"]
    return "\n".join(lines)


def rows_of(report: dict):
    """The per-step differences held to the bound: loss, activations, gradients."""
    return report["loss_diff"], report["step_activation_diff"], report["step_grad_diff"]


def _host_copy(a) -> numpy.ndarray:
    """A host array that later steps cannot change (to_numpy returns a NumPy array itself)."""
    return numpy.array(to_numpy(a), copy=True)


def _copy(model):
    """A model of the same architecture and weights (through the checkpoint's description)."""
    return _rebuild(model.to_config(), model)


def _rebuild(config: dict, model):
    """The model `config` describes, with model's weights and input preprocessing."""
    twin = build_layer(config)
    twin.load_state_dict({k: to_numpy(v) for k, v in model.state_dict().items()})
    twin.preprocess = model.preprocess
    return twin
