"""Sequential: layers applied in order, with epilogue fusion (a layer runs the ones it absorbs)."""
from __future__ import annotations

from gpunet.backend import Array
from gpunet.layers.base import Composite, Layer, build_layer, register, trains


@register("Sequential")
class Sequential(Composite):
    """Layers applied in order; parameters keyed "0.weight", "2.bias", ... as in torch."""

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a gpunet layer")
            self.add_child(str(i), layer)
        self.preprocess: dict | None = None  # input preprocessing saved with the model

    @property
    def layers(self) -> list[Layer]:
        return list(self._children.values())

    def forward(self, x: Array) -> Array:
        """The layers in order; a layer followed by ones it absorbs (Dense or Conv2D then ReLU,
        Sigmoid, ...; Conv2D then ReLU then a MaxPool2D) runs them in one pass, as if the user had
        written Dense(..., activation=...): fewer launches on a GPU, fewer passes over memory. The names,
        parameters and outputs are the model's as written (each layer's own forward still runs
        alone, as `gpunet parity` runs them)."""
        layers, i, fused = self.layers, 0, []
        while i < len(layers):
            layer = layers[i]
            absorbed: list[Layer] = []
            while i + len(absorbed) + 1 < len(layers) and layer.absorbs(absorbed + [layers[i + len(absorbed) + 1]]):
                absorbed.append(layers[i + len(absorbed) + 1])
            if absorbed:
                x = layer.forward_absorbing(x, absorbed)
                for following in absorbed:
                    following.save_for_backward(absorbed=True)  # its backward runs inside the absorbing layer's
                members = range(i, i + 1 + len(absorbed))
                fused.append((members, [layers[k]._saved for k in members]))
            else:
                x = layer.forward(x)
            i += 1 + len(absorbed)
        self.save_for_backward(fused=fused)
        return x

    def backprop(self, dy, saved, need_dx):
        layers = self.layers
        for members, states in getattr(saved, "fused", ()):
            # A fused group whose layers ran forward again, some alone: the absorbed ones' flags or the absorbing
            # layer's fused state would be stale, and the gradient silently wrong. (All alone, as gpunet parity
            # runs them, is a consistent unfused state.)
            same = [layers[k]._saved is state for k, state in zip(members, states)]
            if any(same) and not all(same):
                k = members[same.index(False)]
                raise RuntimeError(f"{type(layers[k]).__name__} (layer {k} of the Sequential) ran forward on its own "
                                   f"after the Sequential's forward ran layers {members[0]} to {members[-1]} as one; "
                                   "run the Sequential's forward again before its backward")
        # The leading layers that train nothing (a frozen body) need no backward when no input gradient is wanted.
        first = next((i for i, layer in enumerate(layers) if trains(layer)), len(layers)) if not need_dx else 0
        for layer in reversed(layers[first + 1:]):
            if not getattr(layer._saved, "absorbed", False):
                dy = layer.backward(dy)
        if first < len(layers):
            return layers[first].backward(dy, input_grad=need_dx)
        return None if layers else dy

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self._children)

    def describe(self) -> str:
        inner = "\n".join(f"  ({i}): {layer.describe()}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"

    def to_config(self) -> dict:
        config = {"type": "Sequential", "layers": [layer.to_config() for layer in self.layers]}
        return config if self.name is None else {**config, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> "Sequential":
        return cls(*(build_layer(c) for c in config["layers"]))
