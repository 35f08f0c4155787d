"""The pre-LayerNorm transformer block (as in GPT-2): attention and an MLP, each on a
LayerNorm'd input and added back to the residual stream."""
from __future__ import annotations

from gpunet.backend import Array
from gpunet.layers.activations import GELU
from gpunet.layers.attention import MultiHeadAttention
from gpunet.layers.base import Composite, register
from gpunet.layers.sequential import Sequential
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

    def forward(self, x: Array) -> Array:
        h, branch = self._branches(x, None)
        self.save_for_backward(chain=())
        return branch if h is None else h + branch

    def absorbs(self, following) -> bool:
        """Blocks right after, and a LayerNorm after them: each residual add that ends a block
        then runs inside the next layer norm (one launch fewer per block on a GPU). Not when the
        add is fused with an active dropout already."""
        *blocks, last = following
        return (isinstance(last, (TransformerBlock, LayerNorm)) and all(isinstance(b, TransformerBlock) for b in blocks)
                and not any(b.drop2.active for b in [self, *blocks]))

    def forward_absorbing(self, x, following):
        h, branch = self._branches(x, None)
        norm_saved = None
        for layer in following:
            if isinstance(layer, TransformerBlock):
                h, branch = layer._branches(branch, h)
            else:  # the closing LayerNorm; Sequential replaces what it saved, so it is kept here
                _, y = layer.forward_add(branch, h)
                norm_saved = layer.saved
        self.save_for_backward(chain=tuple(following), norm_saved=norm_saved)
        return y if norm_saved is not None else branch if h is None else h + branch

    def _branches(self, x, residual):
        """(h, the MLP's branch) of y = h + branch, on x, or on x + residual summed inside ln1
        (the previous block's closing add); h is None when the second dropout added it already."""
        # the norms' outputs feed only products (attention's and the MLP's first projection): in mixed precision
        # their 16-bit copies, written so by the norm (for_product)
        if residual is None:
            normed = self.ln1.forward(x, for_product=True)
        else:
            x, normed = self.ln1.forward_add(x, residual, for_product=True)
        branch = self.attn.forward(normed)
        if self.drop1.active:  # the residual add is fused with the dropout (one kernel on a GPU)
            h = self.drop1.forward_add(branch, x)
            normed = self.ln2.forward(h, for_product=True)
        else:  # ... or with the layer norm that follows it (one kernel on a GPU)
            self.drop1.forward(branch)  # the identity here: records that it ran
            h, normed = self.ln2.forward_add(branch, x, for_product=True)
        if self.drop2.active:
            return None, self.drop2.forward_add(self.mlp.forward(normed), h)
        return h, self.drop2.forward(self.mlp.forward(normed))  # (the identity)

    def backprop(self, dy, saved, need_dx):
        chain = getattr(saved, "chain", ())  # (nothing saved: the children ran one by one)
        if chain and isinstance(chain[-1], LayerNorm):
            dy = chain[-1]._backward(dy, saved.norm_saved, None)
            chain = chain[:-1]
        for block in reversed(chain):
            dy = block._backprop_block(dy)
        return self._backprop_block(dy)

    def _backprop_block(self, dy):
        # each residual gradient add runs inside the layer norm's backward (one kernel on a GPU)
        dh = self.ln2.backward_add(self.mlp.backward(self.drop2.backward(dy)), dy)
        return self.ln1.backward_add(self.attn.backward(self.drop1.backward(dh)), dh)
