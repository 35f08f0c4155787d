"""Character-level language models: a recurrent one and a decoder-only transformer.

Both map integer ids (B, T) to next-character logits (B, T, vocab_size); train them with
gn.losses.softmax_cross_entropy against the ids shifted by one position.
"""
from __future__ import annotations

from gpunet.layers import (GRU, LSTM, RNN, Dense, Dropout, Embedding, Layer, LayerNorm, PositionalEmbedding,
                           Sequential, TransformerBlock)

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def char_rnn(vocab_size: int, embedding_dim: int = 64, hidden_size: int = 256, cell: str = "lstm",
             num_layers: int = 1, dropout: float = 0.0) -> Sequential:
    """Embedding -> num_layers recurrent layers (cell: lstm, gru or rnn) -> Dense head."""
    if cell not in CELLS:
        raise ValueError(f"char_rnn: unknown cell {cell!r}; choose one of {sorted(CELLS)}")
    layers: list[Layer] = [Embedding(vocab_size, embedding_dim)]
    size = embedding_dim
    for _ in range(num_layers):
        layers.append(CELLS[cell](size, hidden_size))
        if dropout:
            layers.append(Dropout(dropout))
        size = hidden_size
    layers.append(Dense(hidden_size, vocab_size))
    return Sequential(*layers)


def transformer(vocab_size: int, context: int = 64, d_model: int = 128, num_heads: int = 4, num_layers: int = 2,
                mlp_ratio: int = 4, dropout: float = 0.0) -> Sequential:
    """Decoder-only: token + learned position embeddings, num_layers causal pre-LN blocks, a final
    LayerNorm and a Dense head. Sequences may be up to `context` long."""
    layers = [Embedding(vocab_size, d_model, std=0.02), PositionalEmbedding(context, d_model)]
    if dropout:
        layers.append(Dropout(dropout))
    layers += [TransformerBlock(d_model, num_heads, mlp_ratio, dropout, causal=True) for _ in range(num_layers)]
    layers += [LayerNorm(d_model), Dense(d_model, vocab_size)]
    return Sequential(*layers)
