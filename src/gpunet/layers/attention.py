"""Multi-head scaled dot-product self-attention, torch.nn.MultiheadAttention(batch_first=True) layout.

Parameters: in_proj_weight (3d, d) packing W_q, W_k, W_v; in_proj_bias (3d,); out_proj.weight
(d, d); out_proj.bias (d,). The attention itself is one op (Ops.attention: batched matmuls on
the CPU, fused kernels reading q, k, v where the projection wrote them on a GPU), never a Python
loop over positions.
"""
from __future__ import annotations

import numpy

from gpunet import init as initialisers
from gpunet.backend import Array, ops_for
from gpunet.layers.base import Layer, register
from gpunet.layers.checks import check_float_input, check_last_dim, check_ndim


@register("MultiHeadAttention")
class MultiHeadAttention(Layer):
    """Self-attention on (B, T, d); with causal=True position t attends to positions <= t."""

    def __init__(self, d_model: int, num_heads: int, causal: bool = False):
        if d_model < 1 or num_heads < 1 or d_model % num_heads:
            raise ValueError(f"MultiHeadAttention: d_model {d_model} must be a positive multiple of "
                             f"num_heads {num_heads}")
        super().__init__(d_model=d_model, num_heads=num_heads, causal=causal)
        self.causal = causal
        # torch's initialisation: xavier_uniform on the packed projection, zero biases
        self.add_param("in_proj_weight", initialisers.xavier_uniform((3 * d_model, d_model)))
        self.add_param("in_proj_bias", numpy.zeros(3 * d_model, dtype="float32"))
        self.add_param("out_proj.weight", initialisers.torch_default((d_model, d_model)))
        self.add_param("out_proj.bias", numpy.zeros(d_model, dtype="float32"))

    def forward(self, x: Array) -> Array:
        w = self.params["in_proj_weight"]
        check_ndim(self, x, (3,), "(B, T, d_model)")
        check_last_dim(self, x, w.shape[1])
        check_float_input(self, x, w.dtype, sixteen_bit_copy=True)
        ops = ops_for(x, w, op="MultiHeadAttention.forward")
        b, t, d = x.shape
        heads = self.config["num_heads"]
        # x2 and mixed only feed the weights' products: 16 bits in mixed precision, the same copy kept for the
        # backward and multiplied now (one cast for both; fp32: the arrays themselves; state: see Ops.attention)
        x2 = ops.store_16bit(x.reshape(b * t, d))
        qkv = ops.linear(x2, w, self.params["in_proj_bias"]).reshape(b, t, 3, heads, d // heads)
        mixed, state = ops.attention(qkv, self.causal)  # q, k, v read in place: no transposes
        mixed = ops.store_16bit(mixed.reshape(b * t, d))
        y = ops.linear(mixed, self.params["out_proj.weight"], self.params["out_proj.bias"]).reshape(b, t, d)
        self.save_for_backward(x2=x2, mixed=mixed, state=state)
        return y

    def backprop(self, dy, saved, need_dx):
        ops = ops_for(dy, self.params["in_proj_weight"], op="MultiHeadAttention.backward")
        b, t, d = dy.shape
        heads = self.config["num_heads"]
        g = self.grads
        dmixed = ops.linear_backward(saved.mixed, self.params["out_proj.weight"], dy.reshape(b * t, -1),
                                     g["out_proj.weight"], g["out_proj.bias"])
        dqkv = ops.attention_backward(dmixed.reshape(b, t, heads, d // heads), saved.state)
        dx = ops.linear_backward(saved.x2, self.params["in_proj_weight"], dqkv.reshape(b * t, -1),
                                 g["in_proj_weight"], g["in_proj_bias"], need_dx)
        return None if dx is None else dx.reshape(b, t, -1)
