"""gn.Model: a directed acyclic graph of layers (skip connections, several inputs and outputs, shared
layers), built from symbolic values as Keras's functional API builds one.

The graph becomes a program of steps, one per node in the order the nodes were made (a topological
order): forward runs them in that order, backward in reverse, each node's backward its layer's own,
and a value used by several nodes gets the sum of their gradients. The layers are the model's children
under their names ("fc1", or defaults "dense", "dense_1", ...), so parameters are keyed "fc1.weight".

A layer called by several nodes shares its weights: forward keeps each call's record (what the layer
and the layers under it saved, Layer.record) and backward restores it before that call's backward; the
layer's gradient is the sum over its calls, and afterwards the layer holds its last call's record (a
direct layer.backward refers to its last call). A node followed by a node it absorbs (Dense then ReLU),
neither shared and the first's output used by nothing else, runs as one, as in a Sequential."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from gpunet.backend import ops_for
from gpunet.layers.base import Composite, Layer, build_layer, register, trains
from gpunet.layers.graph import Input, Node, Value, default_names


@dataclass
class Step:
    name: str                  # the layer's name in the model
    ins: list[int]             # value slots read
    many: bool                 # called with a list
    outs: list[int]            # value slots written
    listed: bool = False       # the layer gives a list (a gn.Model with several outputs), even of one
    absorbed: list[int] = field(default_factory=list)  # steps this one runs inside its own (fusion)
    inside: bool = False       # run by the step that absorbs it


@register("Model")
class Model(Composite):
    """A graph of layers from gn.Input values to outputs: gn.Model(inputs=x, outputs=y) or lists of them."""

    def __init__(self, inputs, outputs):
        super().__init__()
        self._many_in, ins = _listed(inputs, "inputs")
        self._many_out, outs = _listed(outputs, "outputs")
        for v in ins:
            if v.node is not None:
                raise ValueError("gn.Model: every item of inputs must be a gn.Input, not a layer's output")
        if len({id(v) for v in ins}) != len(ins):
            raise ValueError("gn.Model: the same gn.Input is listed twice in inputs")
        nodes = _nodes_between(ins, outs)
        slot: dict[int, int] = {}
        for v in ins + [v for node in nodes for v in node.outputs]:
            slot[id(v)] = len(slot)
        layers: list[Layer] = []
        for node in nodes:
            if not any(node.layer is seen for seen in layers):
                layers.append(node.layer)
        names = default_names(layers)
        for name, layer in zip(names, layers):
            self.add_child(name, layer)
        name_of = {id(layer): name for layer, name in zip(layers, names)}
        self._steps = [Step(name_of[id(n.layer)], [slot[id(v)] for v in n.inputs], n.many,
                            [slot[id(v)] for v in n.outputs], n.listed) for n in nodes]
        self._inputs = [slot[id(v)] for v in ins]
        self._outputs = [slot[id(v)] for v in outs]
        self._input_specs = [(v.shape, v.dtype) for v in ins]
        self._shapes = [v.shape for v in ins + [v for node in nodes for v in node.outputs]]  # per slot, no batch axis
        self._slots = len(slot)
        calls: dict[str, int] = {}
        for step in self._steps:
            calls[step.name] = calls.get(step.name, 0) + 1
        self._shared = {name for name, n in calls.items() if n > 1}
        self._plan_fusion()
        self.preprocess: dict | list | None = None  # input preprocessing saved with the model (one per input)

    # -- structure
    @property
    def layers(self) -> list[Layer]:
        return list(self._children.values())

    def __getitem__(self, name: str) -> Layer:
        if name not in self._children:
            raise KeyError(f"gn.Model has no layer named {name!r}; its layers: {', '.join(self._children)}")
        return self._children[name]

    @property
    def several_inputs(self) -> bool:
        return self._many_in

    @property
    def several_outputs(self) -> bool:
        return self._many_out

    @property
    def input_shapes(self) -> list[tuple]:
        return [shape for shape, _ in self._input_specs]

    def calls(self, batch: int) -> list[tuple[Layer, tuple]]:
        """Each node's layer and its (first) input's shape with the batch axis, in the order they run."""
        return [(self._children[step.name], (batch, *self._shapes[step.ins[0]])) for step in self._steps]

    def nodes(self) -> list[tuple[str, Layer, list[tuple]]]:
        """Each node in the order it runs: its layer's name, the layer, its outputs' shapes (without the batch axis)."""
        return [(step.name, self._children[step.name], [self._shapes[s] for s in step.outs]) for step in self._steps]

    def output_shapes(self, batch: int) -> list[tuple]:
        return [(batch, *self._shapes[s]) for s in self._outputs]

    def _plan_fusion(self) -> None:
        """Chains a layer absorbs (Sequential's fusion): each link's output read by the next link alone."""
        readers: dict[int, int] = {}
        for step in self._steps:
            for s in step.ins:
                readers[s] = readers.get(s, 0) + 1
        for step in self._steps:
            if step.inside or step.name in self._shared or step.many or step.listed:
                continue
            layer, tail = self._children[step.name], step
            while readers.get(tail.outs[0]) == 1 and tail.outs[0] not in self._outputs:
                nxt = next(j for j, other in enumerate(self._steps) if tail.outs[0] in other.ins)
                follower = self._steps[nxt]
                chain = [self._children[self._steps[j].name] for j in step.absorbed + [nxt]]
                if follower.name in self._shared or follower.many or follower.listed \
                        or not layer.absorbs(chain):
                    break
                step.absorbed.append(nxt)
                follower.inside = True
                tail = follower

    # -- running
    def forward(self, x):
        values: list = [None] * self._slots
        for s, a in zip(self._inputs, self._arrays(x)):
            values[s] = a
        records = {}
        for k, step in enumerate(self._steps):
            if step.inside:
                continue
            layer = self._children[step.name]
            args = [values[s] for s in step.ins] if step.many else values[step.ins[0]]
            if step.absorbed:
                followers = [self._children[self._steps[j].name] for j in step.absorbed]
                y = layer.forward_absorbing(args, followers)
                for follower in followers:
                    follower.save_for_backward(absorbed=True)  # its backward runs inside the absorbing layer's
                outs = self._steps[step.absorbed[-1]].outs
            else:
                y = layer.forward(args)
                outs = step.outs
            for s, a in zip(outs, _sequence(y, len(outs), step.name) if step.listed else [y]):
                values[s] = a
            if step.name in self._shared:
                records[k] = layer.record()
                for each in layer._subtree():
                    each.release_work_arrays()
        self.save_for_backward(values=values, records=records)
        ys = [values[s] for s in self._outputs]
        return ys if self._many_out else ys[0]

    @property
    def saved(self) -> SimpleNamespace:
        if self._saved is None:
            raise RuntimeError("gn.Model: backward called before forward")
        return self._saved

    def backprop(self, dy, saved, need_dx):
        grads: list = [None] * self._slots
        dys = _sequence(dy, len(self._outputs), "the model's outputs") if self._many_out else [dy]
        for s, g in zip(self._outputs, dys):
            grads[s] = g if grads[s] is None else grads[s] + g
        wanted = self._wanted(need_dx)
        done: set[str] = set()
        for k in reversed(range(len(self._steps))):
            step = self._steps[k]
            if step.inside:
                continue
            outs = self._steps[step.absorbed[-1]].outs if step.absorbed else step.outs
            if all(grads[s] is None for s in outs):
                continue  # nothing it made reaches an output
            layer = self._children[step.name]
            need_in = any(wanted[s] for s in step.ins)
            if not need_in and not trains(layer):
                continue
            if k in saved.records:
                layer.restore(saved.records[k])
            earlier = _copies(layer.grads) if step.name in done and trains(layer) else None
            g = [grads[s] if grads[s] is not None else _zeros_like(saved.values[s]) for s in outs]
            dx = layer.backward(g if step.listed else g[0], input_grad=need_in)
            if earlier is not None:
                for key, value in earlier.items():
                    layer.grads[key] += value  # in place: a flat buffer's views stay views
            done.add(step.name)
            if need_in:
                for s, d in zip(step.ins, _sequence(dx, len(step.ins), step.name) if step.many else [dx]):
                    if wanted[s] and d is not None:
                        grads[s] = d if grads[s] is None else grads[s] + d
        for k in sorted(saved.records):  # each shared layer ends holding its last call's record
            self._children[self._steps[k].name].restore(saved.records[k])
        if not need_dx:
            return None
        dxs = [grads[s] if grads[s] is not None else _zeros_like(saved.values[s]) for s in self._inputs]
        return dxs if self._many_in else dxs[0]

    def _wanted(self, need_dx: bool) -> list[bool]:
        """Per value: whether its gradient is needed (a layer before it trains, or the input gradient is asked)."""
        wanted = [False] * self._slots
        for s in self._inputs:
            wanted[s] = need_dx
        for step in self._steps:
            want = trains(self._children[step.name]) or any(wanted[s] for s in step.ins)
            for s in step.outs:
                wanted[s] = want
        return wanted

    def _arrays(self, x) -> list:
        if self._many_in:
            if not isinstance(x, (list, tuple)) or len(x) != len(self._inputs):
                got = f"a list of {len(x)}" if isinstance(x, (list, tuple)) else f"one {type(x).__name__}"
                raise ValueError(f"gn.Model: expected a list of {len(self._inputs)} input arrays (in the order of "
                                 f"inputs, shapes {self.input_shapes} after the batch axis), got {got}")
            return list(x)
        if isinstance(x, (list, tuple)):
            raise ValueError(f"gn.Model: expected one input array of shape (batch, *{self._input_specs[0][0]}), "
                             f"got a list of {len(x)}")
        return [x]

    # -- description and checkpoints
    def describe(self) -> str:
        def source(s):
            return f"input_{self._inputs.index(s)}" if s in self._inputs else f"v{s}"
        lines = [f"  v{','.join(map(str, step.outs))} = {step.name}: {self._children[step.name].describe()}"
                 f"({', '.join(source(s) for s in step.ins)})" for step in self._steps]
        outputs = ", ".join(source(s) for s in self._outputs)
        return "Model(\n" + "\n".join(lines) + f"\n  outputs: {outputs}\n)"

    def to_config(self) -> dict:
        config = {"type": "Model",
                  "layers": [[name, _unnamed(layer.to_config())] for name, layer in self._children.items()],
                  "inputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in self._input_specs],
                  "nodes": [{"layer": step.name, "inputs": step.ins, "many": step.many, "outputs": len(step.outs),
                             **({"listed": True} if step.listed else {})} for step in self._steps],
                  "outputs": self._outputs, "many_inputs": self._many_in, "many_outputs": self._many_out}
        return config if self.name is None else {**config, "name": self.name}

    @classmethod
    def from_config(cls, config: dict) -> "Model":
        layers = {}
        for name, layer_config in config["layers"]:
            layers[name] = build_layer(layer_config)
            layers[name].name = name
        values: list = [Input(tuple(spec["shape"]), spec["dtype"]) for spec in config["inputs"]]
        inputs = list(values)
        for node in config["nodes"]:
            args = [values[s] for s in node["inputs"]]
            made = layers[node["layer"]](args if node["many"] else args[0])
            values.extend(made if isinstance(made, list) else [made])
        outputs = [values[s] for s in config["outputs"]]
        return cls(inputs if config["many_inputs"] else inputs[0], outputs if config["many_outputs"] else outputs[0])

    @property
    def takes_list(self) -> bool:  # type: ignore[override]
        return self._many_in


def _listed(values, what: str) -> tuple[bool, list[Value]]:
    many = isinstance(values, (list, tuple))
    items = list(values) if many else [values]
    if not items or not all(isinstance(v, Value) for v in items):
        raise TypeError(f"gn.Model: {what} must be a symbolic value (gn.Input, or a layer called on one) or a "
                        f"non-empty list of them, got {values!r}")
    return many, items


def _nodes_between(ins: list[Value], outs: list[Value]) -> list[Node]:
    """The nodes the outputs depend on, in the order they were made; every path must start at an input."""
    allowed, found, stack = {id(v) for v in ins}, {}, list(outs)
    while stack:
        v = stack.pop()
        if id(v) in allowed:
            continue
        if v.node is None:
            raise ValueError(f"gn.Model: the outputs depend on a gn.Input of shape {v.shape} that is not in inputs")
        if id(v.node) not in found:
            found[id(v.node)] = v.node
            stack.extend(v.node.inputs)
    return sorted(found.values(), key=lambda node: node.order)


def _sequence(items, count: int, where: str) -> list:
    if not isinstance(items, (list, tuple)) or len(items) != count:
        raise ValueError(f"gn.Model: {where} expected a list of {count} arrays, got "
                         f"{len(items) if isinstance(items, (list, tuple)) else 'one ' + type(items).__name__}")
    return list(items)


def _unnamed(config: dict) -> dict:
    return {key: value for key, value in config.items() if key != "name"}  # the model keys it by its name


def _copies(grads) -> dict:
    return {key: value.copy() for key, value in grads.items()}


def _zeros_like(a):
    return ops_for(a, op="Model.backward").xp.zeros_like(a)
