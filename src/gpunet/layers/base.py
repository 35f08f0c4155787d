"""Layer, the layer protocol; Composite, a layer made of child layers; Sequential.

Every layer keeps `params` and `grads` (same keys, PyTorch state_dict names and layouts),
`buffers` for non-trained state (batch-norm running statistics), and explicit
`forward(x)` / `backward(dy)`: backward writes the parameter gradients into `grads` (they are
overwritten, not accumulated) and returns the gradient with respect to the last forward's input.

The protocol a layer implements (the README's "Writing a layer" walks through one):
- `__init__`: `super().__init__(**constructor_args)` (saved checkpoints rebuild the layer from
  them), then `self.add_param(name, array)` per parameter, in state_dict order.
- `forward(x)`: computes y and calls `self.save_for_backward(name=value, ...)` with what the
  backward needs (with nothing if it needs nothing: the call also records that forward ran).
- `backprop(dy, saved, need_dx)`: the one backward hook. `saved` holds what forward saved, as
  attributes; the hook writes `self.grads[...]` and returns dx (it may return None when
  need_dx is False: only parameter gradients are wanted, as for a model's first layer).
`backward(dy)` and `backward_params(dy)` are written once, here, over that hook; called before
any forward they raise "LayerName: backward called before forward" (for a composite, the error
of the child that has not run).

A Composite's children register themselves on attribute assignment (`self.ln1 = LayerNorm(d)`,
as DeZero's Layer.__setattr__), in assignment order, which is the order of its parameter names.
Parameters are added by name instead (add_param): their names are state_dict keys, some with
dots (attention's "out_proj.weight"), and `.to()` and checkpoint loading replace the arrays in
`params`, where an attribute would keep the old one.

Flat buffers (gpunet.layers.flat): the model an optimizer (or clip_grad_norm) is given keeps its
parameters in one contiguous buffer per device and dtype, its gradients in another of the same
layout (and the optimizer its state in more), built the first time one of them asks
(`flat_parameters(model)`, kept as `model._flat`). Then `params[name]` and `grads[name]` are
views of those buffers, under the same names in the same order, so a layer writes its gradients
in place (`self.grads["weight"][...] = ...`, or `out=`) and never replaces the array. `.to()`,
`load_state_dict` and checkpoints work on the views as on any array; replacing one (as `.to()`
and loading do) leaves the buffer stale, and the next optimizer step or clip_grad_norm rebuilds
it from the arrays then in place (same layout: the optimizer's state is kept).
Layer types that checkpoints may name are registered under an explicit name with @register.
"""
from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy

from gpunet.backend import device as resolve_device
from gpunet.backend import Array, Device, is_cupy_array, to_device
from gpunet.layers.tree import TreeView

LAYER_TYPES: dict[str, type[Layer]] = {}  # name in a checkpoint's architecture -> layer class
L = TypeVar("L", bound="Layer")


def register(name: str, *, replace: bool = False) -> Callable[[type[L]], type[L]]:
    """Class decorator: `@register("Conv1D")` makes checkpoints that name "Conv1D" build this class.

    A name already held by another class is refused unless replace=True, so a user's layer never
    silently takes the place of a built-in one (re-running a class definition, as a notebook or a
    module reload does, replaces its older self)."""
    def decorate(cls: type[L]) -> type[L]:
        old = LAYER_TYPES.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
        if old is not None and old is not cls and not same and not replace:
            raise ValueError(f"layer type name {name!r} is already registered to {old.__module__}.{old.__qualname__}; "
                             f"register {cls.__qualname__} under another name, or pass replace=True")
        LAYER_TYPES[name] = cls
        return cls
    return decorate


def registered_name(cls: type) -> str:
    for name, registered in LAYER_TYPES.items():
        if registered is cls:
            return name
    raise TypeError(f"{cls.__qualname__} is not a registered layer type, so a checkpoint could not rebuild it; "
                    f"decorate it with @gpunet.layers.register({cls.__name__!r})")


def check_name(name: Any, where: str) -> str | None:
    """A layer's name: None, or an identifier (a dot would split its parameters' keys in two)."""
    if name is not None and not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"{where}: name must be an identifier (letters, digits and _, no dots), got {name!r}")
    return name


class LayerType(type):
    """Every layer takes `name=` without its constructor declaring it: the name is taken off here."""

    def __call__(cls, *args: Any, name: str | None = None, **kwargs: Any):
        layer = super().__call__(*args, **kwargs)
        if name is not None or "name" not in layer.__dict__:
            layer.name = check_name(name, cls.__name__)
        return layer


class Layer(metaclass=LayerType):
    name: str | None  # set by LayerType after __init__: a graph model keys the layer's parameters by it
    takes_list = False  # whether forward takes a list of arrays (merge layers; a gn.Model with several inputs)

    def __init__(self, **config: Any) -> None:
        self._setup(config)
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}

    def _setup(self, config: dict) -> None:
        self.config = config  # constructor arguments: enough to rebuild the layer
        self.training = True
        self.device = "cpu"
        self._children: dict[str, Layer] = {}
        self._saved: SimpleNamespace | None = None
        self.frozen = False  # freeze(): its parameters are left out of the update, their gradients not computed

    def __setattr__(self, name, value):
        if isinstance(value, Layer) and not name.startswith("_"):  # a _name holds a layer without owning it
            self.add_child(name, value)
        elif name in self.__dict__.get("_children", ()):
            raise TypeError(f"{type(self).__name__}: child layer '{name}' can only be replaced by a layer")
        object.__setattr__(self, name, value)

    # -- parameters and children
    def add_param(self, name: str, value: Array) -> None:
        self.params[name] = value
        self.grads[name] = numpy.zeros_like(value)

    def add_child(self, name: str, layer: "Layer") -> None:
        raise TypeError(f"{type(self).__name__}: only a Composite has child layers; derive from Composite "
                        f"to hold '{name}' (or name the attribute '_{name}' to keep a layer it does not own)")

    def children(self) -> list[tuple[str, "Layer"]]:
        return list(self._children.items())

    def state_dict(self) -> dict:
        """Parameters and buffers by PyTorch state_dict name."""
        return {**self.params, **self.buffers}

    def load_state_dict(self, state: dict, strict: bool = True) -> "Layer":
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}: state_dict mismatch; missing {missing}, unexpected {unexpected}")
        for name, value in state.items():
            if name not in own:
                continue
            target = own[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{type(self).__name__}: '{name}' has shape {tuple(target.shape)}, got {tuple(value.shape)}")
            # a copy, as torch's load_state_dict copies: training must not write into the caller's arrays
            _assign(self, name, to_device(numpy.array(_host(value), dtype=target.dtype), self.device))
        return self

    def num_params(self) -> int:
        return int(sum(int(numpy.prod(p.shape)) for p in self.params.values()))

    # -- modes and devices
    def train(self, mode: bool = True) -> "Layer":
        self.training = mode
        for child in self._children.values():
            child.train(mode)
        return self

    def eval(self) -> "Layer":
        return self.train(False)

    # -- freezing: fine-tuning a part of a model
    def freeze(self) -> "Layer":
        """Leave this layer's parameters (and its children's) out of every optimizer update, of weight
        decay, momentum and clip_grad_norm's norm; their gradients are not computed where the layer can
        skip them (Dense; any layer before which nothing trains runs no backward at all; elsewhere they
        are computed and dropped), and its input gradient still is where a layer before it trains."""
        return self._set_frozen(True)

    def unfreeze(self) -> "Layer":
        """Train this layer's parameters (and its children's) again."""
        return self._set_frozen(False)

    def _set_frozen(self, frozen: bool) -> "Layer":
        self.frozen = frozen
        for child in self._children.values():
            child._set_frozen(frozen)
        return self

    def to(self, device: str | Device | None = None, dtype: str | numpy.dtype | None = None) -> "Layer":
        """Move parameters, gradients and buffers to a device ("cpu"/"gpu"/Device) and/or dtype."""
        name = resolve_device(device).name if device is not None else self.device
        for store in self._own_stores():
            for key, value in store.items():
                keep = value.dtype if (dtype is None or value.dtype.kind != "f") else dtype
                store[key] = to_device(value, name).astype(keep, copy=False)
        for child in self._children.values():
            child.to(name, dtype)
        self.device = name
        self._saved = None  # the last forward's arrays live on the old device or dtype
        return self

    def _own_stores(self) -> tuple:
        return self.params, self.grads, self.buffers

    # -- running
    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def save_for_backward(self, **values) -> None:
        """Keep what backprop needs from this forward (replacing the previous forward's)."""
        self._saved = SimpleNamespace(**values)

    @property
    def saved(self) -> SimpleNamespace:
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}: backward called before forward")
        if getattr(self._saved, "absorbed", False):
            raise RuntimeError(f"{type(self).__name__}: its last forward ran inside the layer before it (fused by "
                               "Sequential); call the Sequential's backward")
        return self._saved

    # -- fusion: Sequential runs the layers right after this one inside it when this one absorbs them
    def absorbs(self, following: list) -> bool:
        """Whether forward_absorbing(x, following) computes the layers `following` (the ones right
        after this, in order) applied to self.forward(x) in one pass, and this layer's backward then
        runs theirs too. Sequential asks with one layer, then (if yes) with the next added, ..."""
        return False

    def forward_absorbing(self, x, following: list):
        raise NotImplementedError(f"{type(self).__name__} absorbs no layer")

    def backprop(self, dy, saved: SimpleNamespace, need_dx: bool):
        """The backward hook: write self.grads, return dx (or None when not need_dx)."""
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def backward(self, dy: Array, input_grad: bool = True) -> Array:
        """Gradient w.r.t. the last forward's input; parameter gradients go to self.grads.
        With input_grad=False only the parameter gradients are computed and None is returned
        (nothing at all for a layer that trains nothing: a frozen one, or one without parameters)."""
        if not input_grad and not trains(self):
            self.saved  # (still the protocol's error when forward never ran)
            return None
        dx = self.backprop(dy, self.saved, input_grad)
        return dx if input_grad else None

    def backward_params(self, dy: Array) -> None:
        """Parameter gradients only: for a first layer, whose input gradient nobody reads."""
        self.backward(dy, input_grad=False)

    def __call__(self, x):
        """forward(x) on arrays; on symbolic values (gn.Input and what layers made of it) a node of a graph model."""
        from gpunet.layers.graph import call_symbolic, is_symbolic  # (graph builds on this module)
        return call_symbolic(self, x) if is_symbolic(x) else self.forward(x)

    def output_shape(self, input_shape, dtype="float32"):
        """(shape, dtype) of the output, without the batch axis, for an input of that shape and dtype (lists of
        them for several inputs or outputs): found by running forward on zeros of batch 1 in eval mode, the
        layer left as it was. A shape it cannot take raises the layer's own error."""
        from gpunet.layers.graph import probe_output
        return probe_output(self, input_shape, dtype)

    # -- per-call records: a layer called several times in one pass (a shared layer) keeps each call's saved state
    def record(self) -> list:
        """What this layer and every layer under it saved in its last forward, to restore() before that call's backward."""
        return [(layer, layer._saved) for layer in self._subtree()]

    @staticmethod
    def restore(record: list) -> None:
        for layer, saved in record:
            layer._saved = saved

    def release_work_arrays(self) -> None:
        """Called after a recorded call (a shared layer's): work arrays a layer keeps between calls, which its record
        holds, must not be written by its next call (the recurrent layers' override). Most layers keep none."""

    def _subtree(self) -> list["Layer"]:
        found = [self]
        for child in self._children.values():
            found.extend(child._subtree())
        return found

    def predict(self, inputs, batch_size: int = 1000, precision: str = "fp32"):
        """(classes, probabilities) for raw inputs (uint8 images as stored, or character ids): the model's
        stored preprocessing (model.preprocess), then forward in eval mode (in `precision`) and a softmax over
        the last axis; NumPy arrays. See gpunet.layers.prediction."""
        from gpunet.layers.prediction import predict  # (prediction imports the backend, as base does)
        return predict(self, inputs, batch_size, precision)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    def __repr__(self) -> str:
        return self.describe()

    def to_config(self) -> dict:
        config: dict[str, Any] = {"type": registered_name(type(self)), "args": dict(self.config)}
        if getattr(self, "frozen", False):  # (only when frozen: architectures saved before freezing stay as they were)
            config["frozen"] = True
        if getattr(self, "name", None) is not None:
            config["name"] = self.name
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Layer":
        return cls(**config.get("args", {}))


class Composite(Layer):
    """A layer made of named child layers; its dicts are live views keyed 'child.name'."""

    def __init__(self, **config: Any) -> None:
        self._setup(config)  # no parameters of its own: those of the children are its own

    def add_child(self, name: str, layer: Layer) -> None:
        self._children[name] = layer  # a replaced child keeps its place, and so its names' order
        _number_streams(self)

    def _own_stores(self) -> tuple:
        return ()

    @property
    def saved(self) -> SimpleNamespace:
        """What this composite saved, if anything: its children keep, and check, their own (so a
        caller may also run the children's forwards one by one, as `gpunet parity` does)."""
        return self._saved if self._saved is not None else SimpleNamespace()

    params = property(lambda self: TreeView(self, "params"))
    grads = property(lambda self: TreeView(self, "grads"))
    buffers = property(lambda self: TreeView(self, "buffers"))


def build_layer(config: dict) -> Layer:
    """Rebuild a layer (or a whole model) from its to_config() description."""
    kind = config.get("type") if isinstance(config, dict) else None
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r} in model description (a layer of your own must be "
                         "registered with gpunet.layers.register before loading)")
    layer = LAYER_TYPES[kind].from_config(config)
    if config.get("name") is not None:
        layer.name = check_name(config["name"], f"layer {kind!r} in model description")
    return layer.freeze() if config.get("frozen") is True else layer


def trains(layer: Layer) -> bool:
    """Whether an optimizer updates some parameter under layer (one not frozen)."""
    if layer._children:
        return any(trains(child) for child in layer._children.values())
    return bool(layer.params) and not getattr(layer, "frozen", False)  # (a user's layer may skip Layer.__init__)


def _number_streams(layer: Layer) -> None:
    """Number the layers with a random stream (Dropout's `stream`) under layer 0, 1, ... in
    depth-first order: their position in the model, the same in every copy of it (a composite
    renumbers its descendants as children are added, so the outermost model's numbering stands)."""
    found = []

    def walk(node):
        if "stream" in node.__dict__:
            found.append(node)
        for child in node._children.values():
            walk(child)

    walk(layer)
    for index, node in enumerate(found):
        node.stream = index


def _host(value):
    if hasattr(value, "detach"):  # a torch tensor, for weights moving in from PyTorch
        return value.detach().cpu().numpy()
    return value.get() if is_cupy_array(value) else value


def _assign(layer: Layer, name: str, value) -> None:
    store = layer.params if name in layer.params else layer.buffers
    store[name] = value
