"""The pre-LayerNorm transformer block (as in GPT-2): attention and an MLP, each on a
LayerNorm'd input and added back to the residual stream."""
from __future__ import annotations

from gpunet.layers.activations import GELU
from gpunet.layers.attention import MultiHeadAttention
from gpunet.layers.base import Composite, Sequential, register
from gpunet.layers.dense import Dense
from gpunet.layers.dropout import Dropout
from gpunet.layers.norm import LayerNorm


@register("TransformerBlock")
class TransformerBlock(Composite):
    """y = h + Dropout(MLP(LN2(h))) with h = x + Dropout(Attention(LN1(x))) on (B, T, d).

    Parameters: ln1.*, attn.* (torch.nn.MultiheadAttention names), ln2.*, mlp.0.* and mlp.2.*
    (an nn.Sequential(Linear(d, ratio*d), GELU(), Linear(ratio*d, d))), in that order: the
    order in which the children are assigned below.
    """

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 causal: bool = True):
        super().__init__(d_model=d_model, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout, causal=causal)
        self.ln1 = LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads, causal=causal)
        self.drop1 = Dropout(dropout)
        self.ln2 = LayerNorm(d_model)
        self.mlp = Sequential(Dense(d_model, mlp_ratio * d_model), GELU(), Dense(mlp_ratio * d_model, d_model))
        self.drop2 = Dropout(dropout)

    def describe(self) -> str:
        c = self.config
        return (f"TransformerBlock(d_model={c['d_model']}, num_heads={c['num_heads']}, "
                f"mlp_ratio={c['mlp_ratio']}, dropout={c['dropout']}, causal={c['causal']})")

    def forward(self, x):
        # the residual adds are fused with the dropouts (one kernel each on a GPU)
        h = self.drop1.forward_add(self.attn.forward(self.ln1.forward(x)), x)
        return self.drop2.forward_add(self.mlp.forward(self.ln2.forward(h)), h)

    def backprop(self, dy, saved, need_dx):
        dh = dy + self.ln2.backward(self.mlp.backward(self.drop2.backward(dy)))
        return dh + self.ln1.backward(self.attn.backward(self.drop1.backward(dh)))
