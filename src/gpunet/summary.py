"""A model summary: each layer, its output shape and parameter count; the activation memory a forward keeps."""
from __future__ import annotations

from gpunet.backend import ops_for_device


def summary(model, input_shape, input_dtype="float32") -> str:
    """Table of layers with output shapes for one sample of input_shape (run in eval mode); a graph model
    (gn.Model) lists its nodes with the shapes found when it was built, a shared layer's parameters once."""
    rows = [("layer", "output shape", "params")]
    if hasattr(model, "nodes"):
        seen = set()
        for name, layer, shapes in model.nodes():
            rows.append((f"{name}: {layer.describe()}", ", ".join(str(s) for s in shapes),
                         f"{0 if name in seen else layer.num_params():,}"))
            seen.add(name)
    else:
        layers = getattr(model, "layers", [model])
        was_training = model.training
        model.eval()
        x = model_input(model, input_shape, input_dtype)
        try:
            for i, layer in enumerate(layers):
                x = layer.forward(x)
                rows.append((f"{i}: {layer.describe()}", str(tuple(x.shape[1:])), f"{layer.num_params():,}"))
        finally:
            model.train(was_training)
    rows.append(("total", "", f"{model.num_params():,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def model_input(model, input_shape, dtype):
    return ops_for_device(model.device).zeros((1, *input_shape), dtype=dtype)


def saved_bytes(model) -> int:
    """The bytes of the arrays model and every layer under it keep from their last forward for the backward
    (what save_for_backward saved): the activation memory of a training step, each array's memory counted once
    (views of one array, or one array saved by two layers, share it)."""
    seen: dict[int, int] = {}

    def count(value) -> None:
        if hasattr(value, "nbytes") and hasattr(value, "dtype") and hasattr(value, "shape"):
            root = value
            while getattr(root, "base", None) is not None and hasattr(root.base, "nbytes"):
                root = root.base
            seen[id(root)] = int(root.nbytes)
        elif isinstance(value, (list, tuple)):
            for item in value:
                count(item)
        elif isinstance(value, dict):
            for item in value.values():
                count(item)
        elif hasattr(value, "__dict__") and not callable(value):
            for item in vars(value).values():
                count(item)

    for layer in model._subtree():
        if layer._saved is not None:
            count(vars(layer._saved))
    return sum(seen.values())
