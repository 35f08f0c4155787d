"""FlatParameters: a model's parameters, and their gradients, in one contiguous buffer per device
and dtype, so that an optimizer updates all of them in one launch and clipping reduces one array.

`flat_parameters(model)` returns the model's FlatParameters, building it on first use (the
optimizers call it when they are made and at every step; clip_grad_norm at every call). Building
copies each parameter and gradient into its group's buffers and puts views of them back in the
layers' `params` / `grads` under the same names, in the same order; the layers never know.
Each parameter starts at a multiple of ALIGN elements; the gaps are zero in every buffer, so
the updates leave them zero and they add nothing to a norm.

Groups are split further by `tags` (an optimizer's parameter group of each name, 0 for its own
settings: a group with its own lr is its own buffer, so one more launch per group) and by the
layers' `frozen` flag (a frozen group is left out of the update and of the clipping norm). With
neither, there is one group per device and dtype, as before.

The FlatParameters is kept on the model (`model._flat`) and is current while every array in
`model.params` / `model.grads` is still the view it made. Whatever replaces an array there
(`.to()`, `load_state_dict`, a user's `model.params[name] = ...`) makes it stale, and the next
`flat_parameters(model)` builds a new one from the arrays then in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gpunet.backend import is_cupy_array, ops_for_device

ALIGN = 64  # elements: 256 bytes of float32, a whole cache line and more, as cudaMalloc aligns


@dataclass(frozen=True)
class FlatGroup:
    """The parameters of one (device, dtype): param and grad are 1-D buffers of `size`; the
    parameter `names[i]` of shape `shapes[i]` is `param[offsets[i] : offsets[i] + its size]`."""

    device: str
    dtype: Any
    param: Any  # a numpy or cupy array
    grad: Any
    names: tuple
    offsets: tuple
    shapes: tuple
    tag: int = 0  # the optimizer's parameter group (0: its own settings)
    frozen: bool = False  # parameters of frozen layers: no update, not in clip_grad_norm's norm

    @property
    def size(self) -> int:
        return int(self.param.size)

    def view(self, buffer, i: int):
        """Parameter i's view of a buffer of this group's layout (param, grad or optimizer state)."""
        start = self.offsets[i]
        return buffer[start : start + math.prod(self.shapes[i])].reshape(self.shapes[i])


class FlatParameters:
    """The model's parameters and gradients moved into one buffer pair per (device, dtype)."""

    def __init__(self, model, tags: tuple | None = None):
        params, grads = model.params, model.grads
        self.names = tuple(params)
        self.tags = tags if tags is not None and len(tags) == len(self.names) else (0,) * len(self.names)
        leaves = _leaves(model)
        self._frozen = tuple(bool(getattr(leaf, "frozen", False)) for leaf in leaves)
        frozen = [f for leaf, f in zip(leaves, self._frozen) for _ in leaf.params]  # (params' order is the leaves')
        by_key: dict = {}
        for i, name in enumerate(self.names):
            p = params[name]
            key = ("gpu" if is_cupy_array(p) else "cpu", p.dtype, self.tags[i], i < len(frozen) and frozen[i])
            by_key.setdefault(key, []).append(name)
        self.groups = []
        for (device, dtype, tag, is_frozen), names in by_key.items():
            shapes = tuple(tuple(params[n].shape) for n in names)
            offsets, total = [], 0
            for shape in shapes:
                offsets.append(total)
                total += -(-math.prod(shape) // ALIGN) * ALIGN
            xp = ops_for_device(device).xp
            group = FlatGroup(device, dtype, xp.zeros(total, dtype=dtype), xp.zeros(total, dtype=dtype),
                              tuple(names), tuple(offsets), shapes, tag, is_frozen)
            for i, name in enumerate(names):
                p, g = group.view(group.param, i), group.view(group.grad, i)
                p[...] = params[name]
                g[...] = grads[name]
                params[name], grads[name] = p, g
            self.groups.append(group)
        # what current() compares, leaf layer by leaf layer (cheaper than going through the names)
        self._leaves = [(leaf, tuple(leaf.params.items()), tuple(leaf.grads.values())) for leaf in leaves]

    def __reduce__(self):
        """A copy of the model (copy.deepcopy, pickle) copies each view apart from the buffers:
        the copy gets no FlatParameters, and builds its own on first use."""
        return _nothing, ()

    def current(self, model) -> bool:
        """Whether model.params and model.grads are still exactly this object's views (the same
        leaf layers, holding the same arrays under the same names)."""
        leaves = _leaves(model)
        if len(leaves) != len(self._leaves):
            return False
        if tuple(bool(getattr(leaf, "frozen", False)) for leaf in leaves) != self._frozen:  # frozen or unfrozen since
            return False
        for leaf, (was, params, grads) in zip(leaves, self._leaves):
            own, own_grads = leaf.params, leaf.grads
            if leaf is not was or len(own) != len(params) or len(own_grads) != len(grads):
                return False
            for (key, value), (old_key, old) in zip(own.items(), params):
                if value is not old or key != old_key:
                    return False
            for value, old in zip(own_grads.values(), grads):
                if value is not old:
                    return False
        return True


def _nothing():
    return None


def _leaves(layer, found=None) -> list:
    """The layers below layer (itself, if it has no children) that hold parameters, in order."""
    found = [] if found is None else found
    children = layer.__dict__.get("_children")
    if children:
        for child in children.values():
            _leaves(child, found)
    elif layer.params:
        found.append(layer)
    return found


def flat_parameters(model, tags: tuple | None = None) -> FlatParameters:
    """The model's current FlatParameters, built (or rebuilt, when stale) here. tags: each parameter's
    group (an optimizer's); None takes the current split as it is (clip_grad_norm's call)."""
    flat = model.__dict__.get("_flat")
    if flat is None or not flat.current(model) or (tags is not None and tags != flat.tags):
        flat = FlatParameters(model, tags if tags is not None else (flat.tags if flat is not None else None))
        object.__setattr__(model, "_flat", flat)
    return flat
