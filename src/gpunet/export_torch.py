"""The torch modules of our own that gn.export.to_torch builds where torch.nn has no twin with gpunet's
parameter names, or none computing what gpunet's layer computes: a Dense with a fused activation,
positional embeddings, batch-first recurrent layers with torch.nn.LSTMCell's names, self-attention taking
one input, the transformer block, the perceptron, the merge layers (Add, Multiply, Concatenate) and a
graph model (Graph: gn.Model's layers as submodules under their names, run in the model's order).

Plain torch operations only, so torch.onnx.export takes them. torch is optional: it is imported when
modules() is first called, never when gpunet is imported.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace


def import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError("gpunet.export needs PyTorch, which is not installed (pip install 'gpunet[bench]', or "
                          "pip install torch)") from None
    return torch


@functools.lru_cache(maxsize=1)
def modules() -> SimpleNamespace:
    """The torch modules of our own, defined once torch is imported."""
    torch = import_torch()
    nn, F = torch.nn, torch.nn.functional
    activations = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu,
                   "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}

    class DenseActivation(nn.Linear):
        """gpunet's Dense with a fused activation: torch.nn.Linear's parameters, then the activation."""

        def __init__(self, in_features, out_features, bias, activation):
            super().__init__(in_features, out_features, bias=bias)
            self.activation = activation

        def forward(self, x):
            return activations[self.activation](super().forward(x))

    class PositionalEmbedding(nn.Module):
        """A learned vector per position added to (B, T, dim) inputs; weight (max_len, dim)."""

        def __init__(self, max_len, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(max_len, dim))

        def forward(self, x):
            return x + self.weight[: x.shape[1]]

    class Recurrent(nn.Module):
        """A batch-first RNN, LSTM or GRU over (B, T, F) returning every step's h (B, T, H), with
        torch.nn.RNNCell / LSTMCell / GRUCell's parameter names and gate order."""

        def __init__(self, kind, input_size, hidden_size, bias):
            super().__init__()
            self.kind, self.input_size, self.hidden_size = kind, input_size, hidden_size
            gates = {"RNN": 1, "LSTM": 4, "GRU": 3}[kind] * hidden_size
            self.weight_ih = nn.Parameter(torch.zeros(gates, input_size))
            self.weight_hh = nn.Parameter(torch.zeros(gates, hidden_size))
            self.bias_ih = nn.Parameter(torch.zeros(gates)) if bias else None
            self.bias_hh = nn.Parameter(torch.zeros(gates)) if bias else None

        def forward(self, x):
            h = x.new_zeros(x.shape[0], self.hidden_size)
            c = torch.zeros_like(h)
            gi_all = F.linear(x, self.weight_ih, self.bias_ih)
            outputs = []
            for t in range(x.shape[1]):
                gi, gh = gi_all[:, t], F.linear(h, self.weight_hh, self.bias_hh)
                if self.kind == "RNN":
                    h = torch.tanh(gi + gh)
                elif self.kind == "LSTM":
                    i, f, g, o = (gi + gh).chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                else:
                    ir, iz, i_n = gi.chunk(3, dim=1)
                    hr, hz, hn = gh.chunk(3, dim=1)
                    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                    h = (1 - z) * torch.tanh(i_n + r * hn) + z * h
                outputs.append(h)
            return torch.stack(outputs, dim=1)

    class SelfAttention(nn.MultiheadAttention):
        """torch.nn.MultiheadAttention(batch_first=True) on one input (B, T, d), causal when asked."""

        def __init__(self, d_model, num_heads, causal):
            super().__init__(d_model, num_heads, batch_first=True)
            self.causal = causal

        def forward(self, x):
            mask = None
            if self.causal:
                mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device), 1)
            return super().forward(x, x, x, attn_mask=mask, need_weights=False)[0]

    class TransformerBlock(nn.Module):
        """gpunet's pre-LayerNorm block: h = x + drop1(attn(ln1(x))); y = h + drop2(mlp(ln2(h)))."""

        def __init__(self, children):
            super().__init__()
            for name, child in children.items():
                self.add_module(name, child)
            self.gpunet_config = {"d_model": self.ln1.normalized_shape[0], "num_heads": self.attn.num_heads,
                                  "mlp_ratio": self.mlp[0].out_features // self.mlp[0].in_features,
                                  "dropout": self.drop1.p, "causal": self.attn.causal}

        def forward(self, x):
            h = x + self.drop1(self.attn(self.ln1(x)))
            return h + self.drop2(self.mlp(self.ln2(h)))

    class Perceptron(nn.Module):
        """sign(w . x + b) in {-1, +1} as int8; weight (1, in), bias (1,)."""

        def __init__(self, in_features):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1, in_features))
            self.bias = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            score = x @ self.weight[0] + self.bias[0]
            return torch.where(score >= 0, 1, -1).to(torch.int8)

    class Add(nn.Module):
        """The sum of a list of tensors, in gpunet's order: ((x0 + x1) + x2) + ..."""

        def forward(self, xs):
            y = xs[0] + xs[1]
            for x in xs[2:]:
                y = y + x
            return y

    class Multiply(nn.Module):
        """The elementwise product of a list of tensors, in gpunet's order."""

        def forward(self, xs):
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
            return y

    class Concatenate(nn.Module):
        """torch.cat of a list of tensors along `axis` (counted with the batch axis, as gpunet's)."""

        def __init__(self, axis):
            super().__init__()
            self.axis = axis

        def forward(self, xs):
            return torch.cat(list(xs), dim=self.axis)

    class Graph(nn.Module):
        """gpunet's gn.Model: the twins of its layers as submodules under the layers' names (so the
        state_dict's names are the model's, "fc1.weight", "enc.0.weight"), run node by node in the model's
        order; a layer called by several nodes is one submodule called several times. Several inputs are
        several forward arguments, several outputs a tuple. The wiring is gpunet's own description of it
        (`gpunet_graph`: the inputs' shapes and dtypes, the nodes as layer names and value numbers, the
        outputs, from model.to_config(); plain data, no code), which from_torch reads back."""

        def __init__(self, children, graph):
            super().__init__()
            self.gpunet_graph = graph
            # per node: its layer's name, the values it reads, whether it takes them as a list (spread into
            # several arguments for a nested graph); its outputs are the next values in order
            self.program = [(node["layer"], list(node["inputs"]), node["many"],
                             node["many"] and isinstance(children[node["layer"]], Graph)) for node in graph["nodes"]]
            for name, child in children.items():
                if hasattr(self, name):  # torch.export and get_submodule reach submodules as attributes
                    raise ValueError(f"layer {name!r} has the name of an attribute of torch.nn.Module (or of this "
                                     "graph module), so it cannot be a submodule under that name; rename the layer "
                                     "(name=...)")
                self.add_module(name, child)

        def forward(self, *xs):
            count = len(self.gpunet_graph["inputs"])
            if len(xs) != count:
                raise TypeError(f"this gpunet graph takes {count} input tensor(s), one per gn.Input, got {len(xs)}")
            values = list(xs)
            for name, ins, many, spread in self.program:
                layer = self._modules[name]
                if spread:
                    y = layer(*[values[s] for s in ins])
                else:
                    y = layer([values[s] for s in ins] if many else values[ins[0]])
                values.extend(y if isinstance(y, (tuple, list)) else [y])
            ys = tuple(values[s] for s in self.gpunet_graph["outputs"])
            return ys if self.gpunet_graph["many_outputs"] else ys[0]

    return SimpleNamespace(torch=torch, nn=nn, DenseActivation=DenseActivation, PositionalEmbedding=PositionalEmbedding,
                           Recurrent=Recurrent, SelfAttention=SelfAttention, TransformerBlock=TransformerBlock,
                           Perceptron=Perceptron, Add=Add, Multiply=Multiply, Concatenate=Concatenate, Graph=Graph)
