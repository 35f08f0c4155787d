"""Layer, the composite tree of layers, and Sequential.

Every layer keeps `params` and `grads` (same keys, PyTorch state_dict names and layouts),
`buffers` for non-trained state (batch-norm running statistics), and explicit
`forward(x)` / `backward(dy)`: backward writes the parameter gradients into `grads` (they are
overwritten, not accumulated) and returns the gradient with respect to the last forward's input.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import numpy

from gpunet.backend import device as resolve_device
from gpunet.backend import to_device

LAYER_TYPES: dict[str, type] = {}


class Layer:
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.__name__] = cls

    def __init__(self, **config):
        self.config = config  # constructor arguments: enough to rebuild the layer
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        self.training = True
        self.device = "cpu"

    # -- parameters
    def add_param(self, name: str, value: numpy.ndarray) -> None:
        self.params[name] = value
        self.grads[name] = numpy.zeros_like(value)

    def children(self) -> list[tuple[str, "Layer"]]:
        return []

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
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> "Layer":
        return self.train(False)

    def to(self, device=None, dtype=None) -> "Layer":
        """Move parameters, gradients and buffers to a device ("cpu"/"gpu"/Device) and/or dtype."""
        name = resolve_device(device).name if device is not None else self.device
        for store in (self.params, self.grads, self.buffers) if not self.children() else ():
            for key, value in store.items():
                keep = value.dtype if (dtype is None or value.dtype.kind != "f") else dtype
                store[key] = to_device(value, name).astype(keep, copy=False)
        for _, child in self.children():
            child.to(name, dtype)
        self.device = name
        return self

    # -- running
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def backward_params(self, dy) -> None:
        """Parameter gradients only: for a first layer, whose input gradient nobody reads."""
        self.backward(dy)

    def __call__(self, x):
        return self.forward(x)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    __repr__ = describe

    def to_config(self) -> dict:
        return {"type": type(self).__name__, "args": dict(self.config)}

    @classmethod
    def from_config(cls, config: dict) -> "Layer":
        return cls(**config.get("args", {}))


class Composite(Layer):
    """A layer made of named child layers; its dicts are live views keyed 'child.name'."""

    def __init__(self, **config):
        self.config = config
        self.training = True
        self.device = "cpu"

    params = property(lambda self: TreeView(self, "params"))
    grads = property(lambda self: TreeView(self, "grads"))
    buffers = property(lambda self: TreeView(self, "buffers"))


class TreeView(MutableMapping):
    """params/grads/buffers of a composite: reads and writes go through to the children."""

    def __init__(self, layer: Composite, kind: str):
        self.layer, self.kind = layer, kind

    def _route(self, key: str):
        prefix, _, rest = key.partition(".")
        for name, child in self.layer.children():
            if name == prefix and rest:
                return getattr(child, self.kind), rest
        raise KeyError(key)

    def __getitem__(self, key):
        store, rest = self._route(key)
        return store[rest]

    def __setitem__(self, key, value):
        store, rest = self._route(key)
        if rest not in store:
            raise KeyError(key)
        store[rest] = value

    def __delitem__(self, key):
        raise TypeError("parameters cannot be deleted from a model")

    def __iter__(self):
        for name, child in self.layer.children():
            for key in getattr(child, self.kind):
                yield f"{name}.{key}"

    def __len__(self):
        return sum(len(getattr(child, self.kind)) for _, child in self.layer.children())


class Sequential(Composite):
    """Layers applied in order; parameters keyed "0.weight", "2.bias", ... as in torch."""

    def __init__(self, *layers: Layer):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a gpunet layer")
        self.layers = list(layers)
        self.preprocess: dict | None = None  # input preprocessing saved with the model

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy, input_grad: bool = True):
        """Backpropagate dy; with input_grad=False the first layer skips its input gradient."""
        for i in range(len(self.layers) - 1, -1, -1):
            if i == 0 and not input_grad:
                self.layers[0].backward_params(dy)
                return None
            dy = self.layers[i].backward(dy)
        return dy

    def backward_params(self, dy) -> None:
        self.backward(dy, input_grad=False)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def describe(self) -> str:
        inner = "\n".join(f"  ({i}): {layer.describe()}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"

    __repr__ = describe

    def to_config(self) -> dict:
        return {"type": "Sequential", "layers": [layer.to_config() for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict) -> "Sequential":
        return cls(*(build_layer(c) for c in config["layers"]))


def build_layer(config: dict) -> Layer:
    """Rebuild a layer (or a whole model) from its to_config() description."""
    kind = config.get("type") if isinstance(config, dict) else None
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r} in model description")
    return LAYER_TYPES[kind].from_config(config)


def _host(value):
    if hasattr(value, "detach"):  # a torch tensor, for weights moving in from PyTorch
        return value.detach().cpu().numpy()
    return value.get() if type(value).__module__.startswith("cupy") else value


def _assign(layer: Layer, name: str, value) -> None:
    store = layer.params if name in layer.params else layer.buffers
    store[name] = value
