"""PyTorch interop: gn.export.to_torch(model) -> torch.nn.Module, gn.export.from_torch(module) -> model.

gpunet's parameters already carry PyTorch's state_dict names and layouts, so a conversion builds the
twin module and copies the state_dict across. torch.nn has a twin with the same names for most layers
(Linear, Conv2d, BatchNorm2d, ...); for the others (a Dense with a fused activation, positional
embeddings, batch-first recurrent layers with torch.nn.LSTMCell's names, self-attention taking one
input, the transformer block, the perceptron, the merge layers, a graph model) small modules of our own
in gpunet.export_torch keep gpunet's names and compute what gpunet's forward computes, in plain torch
operations (so torch.onnx.export takes them).

A gn.Model becomes a gpunet.export_torch.Graph: its layers' twins under the layers' names, run in the
model's order, with the wiring kept on the module as plain data (`gpunet_graph`, from model.to_config():
never pickled code); several inputs are several forward arguments, several outputs a tuple.

torch is optional: it is imported here, inside the functions, never when gpunet is imported.
"""
from __future__ import annotations

import numpy

from gpunet import layers as L
from gpunet import models
from gpunet.backend import to_numpy
from gpunet.export_torch import import_torch as _torch
from gpunet.export_torch import modules as _modules
from gpunet.layers.base import check_name

__all__ = ["from_torch", "to_torch"]

# what Graph keeps of a gn.Model's to_config(): the wiring; the layers are its submodules
GRAPH_KEYS = ("inputs", "nodes", "outputs", "many_inputs", "many_outputs")


def to_torch(model):
    """A torch.nn.Module (on the CPU) with model's weights, buffers and train/eval mode, computing what
    model.forward computes; model.preprocess travels as the module's `gpunet_preprocess` attribute."""
    torch = _torch()
    module = _twin(model, _modules(), "model")
    state = {name: torch.from_numpy(numpy.array(to_numpy(value))) for name, value in model.state_dict().items()}
    module.load_state_dict(state, strict=True)  # the names must agree exactly: that is the contract
    floats = {v.dtype for v in model.state_dict().values() if v.dtype.kind == "f"}
    if floats:
        module.to(getattr(torch, numpy.dtype(max(floats, key=lambda d: d.itemsize)).name))
    module.train(model.training)
    module.gpunet_preprocess = getattr(model, "preprocess", None)
    return module


def from_torch(module):
    """The gpunet model of a torch.nn.Module built from supported layers (those to_torch makes, and
    torch.nn.RNN/LSTM/GRU with one batch-first layer, torch.nn.MultiheadAttention with batch_first),
    with its weights and buffers copied; a module's `gpunet_preprocess` becomes model.preprocess."""
    _torch()
    model = _from(module, _modules(), "module")
    model.train(module.training)
    preprocess = getattr(module, "gpunet_preprocess", None)
    if preprocess is not None:
        model.preprocess = preprocess
    return model


# ---------------------------------------------------------------- gpunet -> torch
def _twin(layer, T, where: str):
    nn, c = T.nn, layer.config
    kind = type(layer)
    if kind is L.Sequential:
        return nn.Sequential(*(_twin(child, T, f"{where}[{i}]") for i, child in enumerate(layer.layers)))
    if kind is L.Model:
        children = {name: _twin(child, T, f"{where}[{name!r}]") for name, child in layer.children()}
        config = layer.to_config()
        try:
            return T.Graph(children, {key: config[key] for key in GRAPH_KEYS})
        except ValueError as error:
            raise TypeError(f"to_torch: {where}: {error}") from None
    if kind is L.Concatenate:
        return T.Concatenate(c["axis"])
    if kind in (L.Add, L.Multiply):
        return (T.Add if kind is L.Add else T.Multiply)()
    if kind is L.TransformerBlock:
        return T.TransformerBlock({name: _twin(child, T, f"{where}.{name}") for name, child in layer.children()})
    if kind is L.Dense:
        if layer.activation is None:
            return nn.Linear(c["in_features"], c["out_features"], bias=c["bias"])
        return T.DenseActivation(c["in_features"], c["out_features"], c["bias"], layer.activation)
    if kind is L.Conv2D:
        return nn.Conv2d(c["in_channels"], c["out_channels"], layer.kernel, layer.stride, layer.padding, bias=c["bias"])
    if kind is L.Conv1D:
        return nn.Conv1d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"],
                         c["dilation"], bias=c["bias"])
    if kind in (L.MaxPool2D, L.AvgPool2D):
        return (nn.MaxPool2d if kind is L.MaxPool2D else nn.AvgPool2d)(layer.kernel, layer.stride)
    if kind in (L.BatchNorm1d, L.BatchNorm2d):
        twin = nn.BatchNorm1d if kind is L.BatchNorm1d else nn.BatchNorm2d
        return twin(c["num_features"], eps=c["eps"], momentum=c["momentum"], affine=c["affine"])
    if kind is L.LayerNorm:
        return nn.LayerNorm(c["normalized_shape"], eps=c["eps"], elementwise_affine=c["elementwise_affine"])
    if kind is L.Embedding:
        return nn.Embedding(c["num_embeddings"], c["embedding_dim"])
    if kind is L.PositionalEmbedding:
        return T.PositionalEmbedding(c["max_len"], c["embedding_dim"])
    if kind in (L.RNN, L.LSTM, L.GRU):
        return T.Recurrent(kind.__name__, c["input_size"], c["hidden_size"], c["bias"])
    if kind is L.MultiHeadAttention:
        return T.SelfAttention(c["d_model"], c["num_heads"], c["causal"])
    if kind is models.Perceptron:
        return T.Perceptron(c["in_features"])
    simple = {L.ReLU: lambda: nn.ReLU(), L.Sigmoid: lambda: nn.Sigmoid(), L.Tanh: lambda: nn.Tanh(),
              L.Identity: lambda: nn.Identity(), L.GELU: lambda: nn.GELU(approximate=c["approximate"]),
              L.Softmax: lambda: nn.Softmax(dim=c["dim"]), L.Dropout: lambda: nn.Dropout(c["p"]),
              L.Flatten: lambda: nn.Flatten(start_dim=c["start_dim"])}
    if kind in simple:
        return simple[kind]()
    raise TypeError(f"to_torch: {where} is a {kind.__name__}, which has no PyTorch twin in gpunet.export")


# ---------------------------------------------------------------- torch -> gpunet
def _from(module, T, where: str):
    nn, torch = T.nn, T.torch
    kind = type(module)

    def refuse(why: str):
        raise TypeError(f"from_torch: {where} ({kind.__name__}) cannot become a gpunet layer: {why}")

    if kind is nn.Sequential:
        return L.Sequential(*(_from(child, T, f"{where}.{name}") for name, child in module.named_children()))
    if kind is T.Graph:
        return _graph(module, T, where)
    if kind in (T.Add, T.Multiply):
        return (L.Add if kind is T.Add else L.Multiply)()
    if kind is T.Concatenate:
        return L.Concatenate(module.axis)
    if kind is T.TransformerBlock:
        block = L.TransformerBlock(**module.gpunet_config)
        for name, child in module.named_children():
            setattr(block, name, _from(child, T, f"{where}.{name}"))
        return block
    if kind in (nn.Linear, T.DenseActivation):
        layer = L.Dense(module.in_features, module.out_features, bias=module.bias is not None,
                        activation=getattr(module, "activation", None))
    elif kind in (nn.Conv2d, nn.Conv1d):
        if module.groups != 1 or (kind is nn.Conv2d and set(module.dilation) != {1}):
            refuse("groups and dilation other than 1 are not supported")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            refuse(f"only zero padding by a number of pixels is supported, got {module.padding!r} "
                   f"({module.padding_mode})")
        args = (module.in_channels, module.out_channels)
        if kind is nn.Conv2d:
            layer = L.Conv2D(*args, _plain(module.kernel_size), _plain(module.stride), _plain(module.padding),
                             bias=module.bias is not None)
        else:
            layer = L.Conv1D(*args, module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0],
                             bias=module.bias is not None)
    elif kind in (nn.MaxPool2d, nn.AvgPool2d):
        if module.padding not in (0, (0, 0)) or module.ceil_mode or getattr(module, "dilation", 1) not in (1, (1, 1)) \
                or getattr(module, "return_indices", False) or getattr(module, "divisor_override", None):
            refuse("only pooling without padding, dilation, ceil_mode, return_indices or divisor_override")
        layer = (L.MaxPool2D if kind is nn.MaxPool2d else L.AvgPool2D)(_plain(module.kernel_size), _plain(module.stride))
    elif kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        if not module.track_running_stats or module.momentum is None:
            refuse("batch norm needs running statistics and a momentum")
        layer = (L.BatchNorm1d if kind is nn.BatchNorm1d else L.BatchNorm2d)(
            module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine)
    elif kind is nn.LayerNorm:
        if len(module.normalized_shape) != 1 or (module.elementwise_affine and module.bias is None):
            refuse("only normalisation over the last axis, with both or neither of weight and bias")
        layer = L.LayerNorm(module.normalized_shape[0], eps=module.eps, elementwise_affine=module.elementwise_affine)
    elif kind is nn.Embedding:
        if module.padding_idx is not None or module.max_norm is not None or module.sparse:
            refuse("padding_idx, max_norm and sparse are not supported")
        layer = L.Embedding(module.num_embeddings, module.embedding_dim)
    elif kind is T.PositionalEmbedding:
        layer = L.PositionalEmbedding(*module.weight.shape)
    elif kind is T.Recurrent:
        layer = getattr(L, module.kind)(module.input_size, module.hidden_size, bias=module.bias_ih is not None)
    elif kind in (nn.RNN, nn.LSTM, nn.GRU):
        if module.num_layers != 1 or module.bidirectional or not module.batch_first \
                or getattr(module, "proj_size", 0) or getattr(module, "nonlinearity", "tanh") != "tanh":
            refuse("only one unidirectional batch_first layer (tanh for RNN, no projection) is supported")
        layer = getattr(L, kind.__name__)(module.input_size, module.hidden_size, bias=module.bias)
        state = {name.removesuffix("_l0"): value for name, value in module.state_dict().items()}
        return layer.load_state_dict(state)
    elif kind in (T.SelfAttention, nn.MultiheadAttention):
        if kind is nn.MultiheadAttention and (not module.batch_first or module.in_proj_weight is None
                                              or module.in_proj_bias is None or module.bias_k is not None
                                              or module.dropout):
            refuse("only batch_first self-attention with packed, biased projections and no dropout is supported")
        layer = L.MultiHeadAttention(module.embed_dim, module.num_heads, causal=getattr(module, "causal", False))
    elif kind is T.Perceptron:
        layer = models.Perceptron(module.weight.shape[1])
    else:
        simple = {nn.ReLU: L.ReLU, nn.Sigmoid: L.Sigmoid, nn.Tanh: L.Tanh, nn.Identity: L.Identity}
        if kind in simple:
            return simple[kind]()
        if kind is nn.GELU:
            return L.GELU(module.approximate)
        if kind is nn.Softmax:
            if module.dim is None:
                refuse("give Softmax a dim")
            return L.Softmax(module.dim)
        if kind is nn.Dropout:
            return L.Dropout(module.p)
        if kind is nn.Flatten:
            if module.end_dim != -1:
                refuse("only flattening to the last axis (end_dim=-1) is supported")
            return L.Flatten(module.start_dim)
        raise TypeError(f"from_torch: {where} is a {kind.__name__}, which gpunet.export cannot convert "
                        f"(torch {torch.__version__})")
    return layer.load_state_dict(module.state_dict())


def _graph(module, T, where: str):
    """The gn.Model of a Graph: each submodule converted, named as it is named there, and called on
    symbolic values as the graph's nodes say (each node's shapes checked again, as when it was built)."""
    graph = module.gpunet_graph
    layers = {}
    for name, child in module.named_children():
        layers[name] = _from(child, T, f"{where}.{name}")
        layers[name].name = check_name(name, f"from_torch: {where}.{name}")
    values = [L.Input(tuple(spec["shape"]), spec["dtype"]) for spec in graph["inputs"]]
    inputs = list(values)
    for node in graph["nodes"]:
        if node["layer"] not in layers:
            raise TypeError(f"from_torch: {where} calls a submodule {node['layer']!r} it does not have")
        args = [values[s] for s in node["inputs"]]
        made = layers[node["layer"]](args if node["many"] else args[0])
        values.extend(made if isinstance(made, list) else [made])
    outputs = [values[s] for s in graph["outputs"]]
    return L.Model(inputs if graph["many_inputs"] else inputs[0], outputs if graph["many_outputs"] else outputs[0])


def _plain(value):
    """A torch size (5, 5) as gpunet's layers are usually given it, 5; (3, 5) as [3, 5]."""
    if isinstance(value, (tuple, list)):
        return value[0] if len(set(value)) == 1 else list(value)
    return value
