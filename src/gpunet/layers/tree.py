"""The params, grads and buffers of a composite layer as one mapping keyed like torch's state_dict
("0.weight", "block.attn.in_proj_weight"): reads and writes go through to the children's own."""
from __future__ import annotations

from collections.abc import MutableMapping


class TreeView(MutableMapping):
    """params/grads/buffers of a composite: reads and writes go through to the children."""

    def __init__(self, layer, kind: str):
        self.layer, self.kind = layer, kind

    def _route(self, key: str):
        prefix, _, rest = key.partition(".")
        child = self.layer._children.get(prefix)
        if child is None or not rest:
            raise KeyError(key)
        return getattr(child, self.kind), rest

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
        for name, child in self.layer._children.items():
            for key in getattr(child, self.kind):
                yield f"{name}.{key}"

    def __len__(self):
        return sum(len(getattr(child, self.kind)) for child in self.layer._children.values())
