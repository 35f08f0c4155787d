"""PyTorch twins of gpunet models: the same architecture as stock torch.nn modules, same weights.

Parameter names match gpunet's except for torch.nn.RNN/LSTM/GRU, whose single-layer weights
carry an "_l0" suffix (weight_ih_l0 is gpunet's weight_ih); `torch_name` maps them.
"""
from __future__ import annotations

import numpy

import gpunet as gn


def import_torch():
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError("PyTorch is not installed (pip install -e '.[test]' brings torch==2.13.0)") from exc
    return torch


RECURRENT = ("RNN", "LSTM", "GRU")


def torch_name(model, key: str) -> str:
    """The twin's state_dict key for a gpunet state_dict key of model."""
    layer = model
    for part in key.split(".")[:-1]:
        if not hasattr(layer, "children") or not layer.children():
            break
        layer = dict(layer.children()).get(part, layer)
    return f"{key}_l0" if type(layer).__name__ in RECURRENT else key


def torch_twin(model):
    """The torch.nn.Sequential twin of a gpunet Sequential, carrying the same weights."""
    torch = import_torch()
    twin = torch.nn.Sequential(*(_module(layer) for layer in model.layers))
    twin.load_state_dict({torch_name(model, k): torch.from_numpy(numpy.array(gn.to_numpy(v)))
                          for k, v in model.state_dict().items()})
    return twin


def _module(layer):
    torch = import_torch()
    nn, c, kind = torch.nn, layer.config, type(layer).__name__
    makers = {
        "Dense": lambda: nn.Linear(c["in_features"], c["out_features"], bias=c["bias"]),
        "Conv2D": lambda: nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"],
                                    c["padding"], bias=c["bias"]),
        "Conv1D": lambda: nn.Conv1d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"],
                                    c["dilation"], bias=c["bias"]),
        "MaxPool2D": lambda: nn.MaxPool2d(c["kernel_size"], c["stride"]),
        "AvgPool2D": lambda: nn.AvgPool2d(c["kernel_size"], c["stride"]),
        "BatchNorm1d": lambda: nn.BatchNorm1d(c["num_features"], c["eps"], c["momentum"]),
        "BatchNorm2d": lambda: nn.BatchNorm2d(c["num_features"], c["eps"], c["momentum"]),
        "LayerNorm": lambda: nn.LayerNorm(c["normalized_shape"], c["eps"]),
        "Dropout": lambda: nn.Dropout(c["p"]), "Flatten": lambda: nn.Flatten(c["start_dim"]),
        "ReLU": nn.ReLU, "Tanh": nn.Tanh, "Sigmoid": nn.Sigmoid, "GELU": lambda: nn.GELU(c["approximate"]),
        "Embedding": lambda: nn.Embedding(c["num_embeddings"], c["embedding_dim"]),
        "PositionalEmbedding": lambda: _Positional(c["max_len"], c["embedding_dim"]),
        "RNN": lambda: _Sequence(nn.RNN, c), "LSTM": lambda: _Sequence(nn.LSTM, c), "GRU": lambda: _Sequence(nn.GRU, c),
        "MultiHeadAttention": lambda: _SelfAttention(c["d_model"], c["num_heads"], c["causal"]),
        "TransformerBlock": lambda: _Block(c),
    }
    if kind not in makers:
        raise ValueError(f"no PyTorch twin for {kind}")
    return makers[kind]()


def _sequence_class(base):
    class Sequence(base):
        """batch_first torch.nn.{RNN,LSTM,GRU} returning the outputs only, as gpunet's layers do."""

        def forward(self, x):
            return super().forward(x)[0]
    return Sequence


def _Sequence(base, c):
    return _sequence_class(base)(c["input_size"], c["hidden_size"], bias=c["bias"], batch_first=True)


def _Positional(max_len, dim):
    torch = import_torch()

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(max_len, dim))

        def forward(self, x):
            return x + self.weight[: x.shape[1]]
    return Positional()


def _SelfAttention(d_model, num_heads, causal):
    torch = import_torch()

    class SelfAttention(torch.nn.MultiheadAttention):
        def forward(self, x):
            t = x.shape[1]
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1) if causal else None
            return super().forward(x, x, x, attn_mask=mask, need_weights=False)[0]
    return SelfAttention(d_model, num_heads, batch_first=True)


def _Block(c):
    torch = import_torch()
    nn, d = torch.nn, c["d_model"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.attn = _SelfAttention(d, c["num_heads"], c["causal"])
            self.drop1 = nn.Dropout(c["dropout"])
            self.ln2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, c["mlp_ratio"] * d), nn.GELU(), nn.Linear(c["mlp_ratio"] * d, d))
            self.drop2 = nn.Dropout(c["dropout"])

        def forward(self, x):
            x = x + self.drop1(self.attn(self.ln1(x)))
            return x + self.drop2(self.mlp(self.ln2(x)))
    return Block()
