"""gn.testing.check_layer: check a layer's hand-written backward before training with it.

An explicit backward is the classic bug of a library like this one: a transposed index or a
missing term trains, only worse. check_layer runs the checks gpunet's own tests run on every
built-in layer (tests/support/gradcheck.py is where it grew from), on a copy of the user's layer:

1. float64 central differences. A seeded upstream gradient dy (standard normal, the output's
   shape) makes the objective f = sum(forward(x) * dy), whose gradient is the backward's answer
   to dy: the whole Jacobian-vector product, not one output's row. Each element of x and of every
   parameter is moved by +-eps and (f+ - f-) / (2 eps) compared with the backward's value. A tensor
   of up to MAX_ELEMENTS elements is checked in every element, a larger one in MAX_ELEMENTS
   elements drawn with the seed.
2. with `torch_module=`, a PyTorch twin: the same state_dict names and values, then the outputs,
   the input gradient and every parameter gradient in float32, within the bound below.
3. when a GPU is usable (gn.has_gpu()), the layer on the CPU against the layer on the GPU in
   float32, within the same bound.

The float64 tolerance: central differences err by eps^2 |f'''| / 6 (about 1e-12 for eps = 1e-6)
plus the objective's rounding, u |f| / eps with u = 1.1e-16 per rounding; the forward's sums
round many times, so ROUNDINGS of them are allowed on the size of the terms of f (sum |y dy|).
Within RTOL of the numeric value or that absolute size, whichever is larger: a wrong element of
ordinary size is off by far more.

The float32 bound (CPU against GPU, gpunet against torch) is gpunet.parity_bound's: each sum of K
terms along the layer's forward and backward moves a result by at most LAMBDA K u of its largest
value (u = 2^-24) on each side, plus PER_FUNCTION ulps per elementwise function. A layer that
parity_bound does not know (a user's own, alone or inside a composite) is allowed the longest sum it
could run: every element of the checked input and of its parameters. A bias's gradient (a parameter
named bias or bias_*, as torch names them) is held to the larger of its own largest value and the
largest gradient reaching its layer (the float32 CPU run's): it sums that gradient's elements, and
before a batch norm they sum to 0 exactly, so the result is rounding noise of their size, not of its
own. (A weight's terms carry the layer's input too: its own size stays its scale.)

Dropout in training mode is checked with its mask: every forward of the check runs under the
check's own seed and step (gpunet.random.using), so each draws the same mask, on the CPU and on
the GPU alike (the masks are a pure function of seed, step and layer); the caller's random state
is untouched. Only a torch twin cannot draw gpunet's masks: that comparison refuses a layer with
dropout active (put both in eval mode, or use p=0).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy

from gpunet import random
from gpunet.backend import has_gpu, to_device, to_numpy
from gpunet.layers import Dropout, Layer
from gpunet.parity_bound import LAMBDA, PER_FUNCTION, UNIT_ROUNDOFF, reduction_path

MAX_ELEMENTS = 4096  # per tensor: every element up to this size, then this many drawn with the seed
EPS = 1e-6  # the finite-difference step (float64)
RTOL = 1e-5  # relative to the numeric value
ROUNDINGS = 64  # float64 roundings allowed on the size of f's terms, per unit of eps (see above)
U64, U32 = UNIT_ROUNDOFF["float64"], UNIT_ROUNDOFF["float32"]
TINY = float(numpy.finfo("float32").tiny)

__all__ = ["MAX_ELEMENTS", "check_layer"]


def check_layer(layer: Layer, x, *, torch_module=None, gpu: bool | None = None, seed: int = 0,
                max_elements: int = MAX_ELEMENTS) -> None:
    """Check layer's backward against float64 finite differences, its torch twin (torch_module,
    if given) and the GPU (when usable; gpu=False skips it, gpu=True requires it). x: one input
    batch (floats; integer ids, as Embedding takes, have no gradient: only the parameters' are
    checked), or a list of them for a model with several inputs (a model with several outputs is
    checked on all of them at once). Works on copies: layer's parameters, gradients, buffers, mode
    and device, and the random state, are left as they were. Raises AssertionError naming the first
    wrong gradient, the element, both values and the tolerance; returns None when all agree."""
    if not isinstance(layer, Layer):
        raise TypeError(f"check_layer: layer is {type(layer).__name__}, not a gpunet layer (gpunet.layers.Layer)")
    many = isinstance(x, (list, tuple)) and all(hasattr(item, "shape") for item in x)  # a list of arrays: several inputs
    xs = [numpy.asarray(to_numpy(item)) for item in (x if many else [x])]
    for item in xs:
        if item.dtype.kind not in "fiub" or item.size == 0:
            raise TypeError(f"check_layer: x must be a non-empty array of numbers (floats, or integer ids), "
                            f"got dtype {item.dtype} and shape {item.shape}")
    if gpu and not has_gpu():
        raise RuntimeError("check_layer: gpu=True but no usable GPU (gn.has_gpu() is False)")
    inputs = Inputs(xs, many)
    name = type(layer).__name__
    dy = _check_finite_differences(layer, name, inputs.cast("float64"), seed, max_elements)
    if torch_module is not None:
        _check_torch_twin(layer, name, torch_module, inputs, dy, seed)
    if gpu or (gpu is None and has_gpu()):
        dy32, reaching = [d.astype("float32") for d in dy], dict[str, float]()
        cpu = _run(_copy(layer, "cpu", "float32"), inputs.cast("float32"), dy32, seed, reaching)
        dev = _run(_copy(layer, "gpu", "float32"), inputs.cast("float32"), dy32, seed)
        atol = _float32_bound(layer, inputs.shapes)
        for what, want in cpu.items():
            _assert_close(f"{name}: {what}", "the GPU", dev[what], "the CPU", want, atol(want, reaching.get(what)))


class Inputs:
    """The checked input batch (or batches, for a model with several inputs), and which take gradients."""

    def __init__(self, arrays: list, many: bool, floats: list | None = None):
        self.arrays, self.many = arrays, many
        self.floats = floats if floats is not None else [a.dtype.kind == "f" for a in arrays]

    def cast(self, dtype: str) -> "Inputs":
        return Inputs([a.astype(dtype) if f else a for a, f in zip(self.arrays, self.floats)], self.many, self.floats)

    @property
    def shapes(self):
        shapes = [tuple(a.shape) for a in self.arrays]
        return shapes if self.many else shapes[0]

    def given(self, convert=lambda a: a):
        """The argument of forward: one array, or the list."""
        items = [convert(a) for a in self.arrays]
        return items if self.many else items[0]

    def label(self, what: str, i: int) -> str:
        return f"{what} {i}" if self.many else what


def _listed(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# -- float64 finite differences

def _check_finite_differences(layer, name, inputs, seed, max_elements):
    """Raises on the first element off its finite difference; returns the upstream gradients dy it drew."""
    twin = _copy(layer, "cpu", "float64")
    draw = numpy.random.default_rng(seed)
    dy = [draw.standard_normal(y.shape) for y in _forward(twin, inputs, seed)]
    got = _run(twin, inputs, dy, seed)

    def terms() -> list:
        return [y * d for y, d in zip(_forward(twin, inputs, seed), dy)]

    def objective() -> float:
        return float(sum(t.sum() for t in terms()))

    # the size of f's terms, for the rounding share of the tolerance (see the module's docstring)
    size = float(sum(numpy.abs(t).sum() for t in terms()))
    atol = ROUNDINGS * U64 * size / EPS
    tensors = [(inputs.label("input gradient", i), a) for i, a in enumerate(inputs.arrays) if inputs.floats[i]]
    tensors += [(f"gradient of '{key}'", value) for key, value in twin.params.items()]
    for what, array in tensors:
        for index in _indices(array.shape, max_elements, seed):
            numeric, analytic = central_difference(objective, array, index), float(got[what][index])
            tol = max(RTOL * abs(numeric), atol)
            if not abs(analytic - numeric) <= tol:
                raise AssertionError(f"check_layer: {name}: {what} is wrong at element {index}: backward gave "
                                     f"{analytic:.9g}, float64 central differences {numeric:.9g} (|diff| "
                                     f"{abs(analytic - numeric):.3g} > tolerance {tol:.3g})")
    return dy


def _indices(shape, limit: int, seed: int) -> list[tuple]:
    """Every index of shape in order, or `limit` of them drawn with the seed (then sorted)."""
    size = math.prod(shape)
    flat = numpy.arange(size) if size <= limit else numpy.sort(
        numpy.random.default_rng(seed).choice(size, size=limit, replace=False))
    return [tuple(int(i) for i in numpy.unravel_index(i, shape)) for i in flat]


# -- a PyTorch twin

def _check_torch_twin(layer, name, torch_module, inputs, dy, seed):
    import torch  # only here: torch is an extra, and only a twin needs it
    if _dropout_active(layer):
        raise ValueError(f"check_layer: {name} has dropout active in training mode, whose masks torch_module cannot "
                         "draw; compare in eval mode (layer.eval() and torch_module.eval()) or with p=0")
    ours = _copy(layer, "cpu", "float32")
    twin = copy.deepcopy(torch_module).float().train(layer.training)  # the caller's module is left as it was
    own, theirs = ours.state_dict(), twin.state_dict()
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    if missing or unexpected:
        raise AssertionError(f"check_layer: {name}: torch_module's state_dict names differ: missing {missing}, "
                             f"unexpected {unexpected}")
    for key, value in own.items():
        _assert_close(f"{name}: state_dict '{key}'", "the layer", value, "torch_module",
                      theirs[key].detach().numpy(), numpy.zeros(()), hint="; give the twin the layer's weights "
                      "(gn.export.to_torch, or torch_module.load_state_dict)")
    inputs32, reaching = inputs.cast("float32"), dict[str, float]()
    got = _run(ours, inputs32, [d.astype("float32") for d in dy], seed, reaching)
    txs = [torch.from_numpy(a.copy()).requires_grad_(f) for a, f in zip(inputs32.arrays, inputs32.floats)]
    tys = _listed(twin(*txs))
    torch.autograd.backward(tys, [torch.from_numpy(d.astype("float32")) for d in dy])
    want = {_output_label(len(tys), i): ty.detach().numpy() for i, ty in enumerate(tys)}
    for i, tx in enumerate(txs):
        if inputs.floats[i]:
            want[inputs.label("input gradient", i)] = tx.grad.numpy()
    for key, p in twin.named_parameters():
        want[f"gradient of '{key}'"] = numpy.zeros(tuple(p.shape), "float32") if p.grad is None else p.grad.numpy()
    atol = _float32_bound(layer, inputs.shapes)
    for what, value in want.items():
        _assert_close(f"{name}: {what}", "gpunet", got[what], "torch_module", value, atol(value, reaching.get(what)))


def _output_label(count: int, i: int) -> str:
    return f"output {i}" if count > 1 else "output"


def _dropout_active(layer) -> bool:
    return (isinstance(layer, Dropout) and layer.active) or any(_dropout_active(c) for _, c in layer.children())


# -- float32 comparisons

def _float32_bound(layer, shape) -> Callable:
    """atol(want): parity_bound's path over the sums of one forward and backward (module docstring)."""
    shapes = shape if isinstance(shape, list) else [shape]
    length, _ = reduction_path(layer, shape if isinstance(shape, list) else tuple(shape))
    for leaf in _unknown_leaves(layer):  # parity_bound counts none of their sums: the longest they could run
        length += sum(math.prod(s) for s in shapes) + leaf.num_params()
    scale = 2 * LAMBDA * (length + PER_FUNCTION) * U32
    return lambda want, reaching=None: scale * max(float(numpy.abs(numpy.asarray(want, "float64")).max(initial=0.0)),
                                                   reaching or 0.0) + TINY


def _unknown_leaves(layer) -> list:
    """The layers in layer's tree that have parameters but whose sums parity_bound does not count (a user's own:
    the known ones with parameters all have sums). Their input's shape is not known here: the bound takes the
    checked layer's input for it."""
    if layer.children():
        return [leaf for _, child in layer.children() for leaf in _unknown_leaves(child)]
    return [layer] if layer.params and reduction_path(layer, (1, 1, 1, 1))[0] == 0 else []


def _assert_close(what, got_name, got, want_name, want, atol, hint=""):
    got, want = numpy.asarray(to_numpy(got), "float64"), numpy.asarray(want, "float64")
    if got.shape != want.shape:
        raise AssertionError(f"check_layer: {what}: {got_name} gave shape {got.shape}, {want_name} {want.shape}")
    bad = numpy.argwhere(~(numpy.abs(got - want) <= atol))  # NaN on either side counts as wrong
    if len(bad):
        i = tuple(int(k) for k in bad[0])
        raise AssertionError(f"check_layer: {what} differs at element {i}: {got_name} {got[i]:.9g}, "
                             f"{want_name} {want[i]:.9g} (|diff| {abs(got[i] - want[i]):.3g} > tolerance "
                             f"{float(numpy.max(atol)):.3g}){hint}")


# -- running a copy

def _copy(layer, device: str, dtype: str) -> Layer:
    """The layer, deep-copied (flat buffers are left behind: see gpunet.layers.flat), on device in dtype."""
    return copy.deepcopy(layer).to(device, dtype)


def _forward(layer, inputs, seed) -> list:
    """One forward under the check's own random state (the same dropout mask every time): the outputs, on the host."""
    with random.using(random.RandomState(seed)):
        return [to_numpy(y) for y in _listed(layer.forward(inputs.given(lambda a: to_device(a, layer.device))))]


def _run(layer, inputs, dy, seed, reaching: dict | None = None) -> dict:
    """Outputs, input gradients (floats only) and every parameter gradient of one forward and backward, on the host.
    reaching: filled with "gradient of 'KEY'" -> the largest gradient that reached that bias's layer."""
    leaves = _record_gradients_reaching(layer) if reaching is not None else {}
    with random.using(random.RandomState(seed)):
        ys = _listed(layer.forward(inputs.given(lambda a: to_device(a, layer.device))))
        grads = [to_device(d.astype(y.dtype), layer.device) for y, d in zip(ys, dy)]
        dx = layer.backward(grads if len(ys) > 1 else grads[0], input_grad=any(inputs.floats))
    found = {_output_label(len(ys), i): to_numpy(y) for i, y in enumerate(ys)}
    for i, d in enumerate(_listed(dx) if any(inputs.floats) else []):
        if inputs.floats[i]:
            found[inputs.label("input gradient", i)] = to_numpy(d)
    found.update({f"gradient of '{key}'": to_numpy(value).copy() for key, value in layer.grads.items()})
    for key in layer.grads if reaching is not None else ():
        prefix, _, param = key.rpartition(".")
        if reaching is not None and prefix in leaves and (param == "bias" or param.startswith("bias_")):
            reaching[f"gradient of '{key}'"] = max(leaves[prefix], default=0.0)
    return found


def _record_gradients_reaching(layer, prefix: str = "") -> dict:
    """{path of each leaf with parameters ("" for layer itself): a list its backprop appends the largest |dy| of
    each call to}; the (copied) leaves' backprop wrapped to record it."""
    if layer.children():
        return {path: seen for name, child in layer.children()
                for path, seen in _record_gradients_reaching(child, f"{prefix}{name}.").items()}
    if not layer.params:
        return {}
    seen, backprop = [], layer.backprop

    def recorded(dy, saved, need_dx):
        seen.append(max((float(numpy.abs(to_numpy(d).astype("float64")).max(initial=0.0)) for d in _listed(dy)),
                        default=0.0))
        return backprop(dy, saved, need_dx)
    layer.backprop = recorded
    return {prefix[:-1]: seen}


def central_difference(f, array, index, eps: float = EPS) -> float:
    """(f() with array[index] + eps - f() with array[index] - eps) / (2 eps); array[index] restored."""
    old = array[index]
    array[index] = old + eps
    plus = f()
    array[index] = old - eps
    minus = f()
    array[index] = old
    return (plus - minus) / (2 * eps)
