"""Dense (fully connected) layer, torch.nn.Linear layout: weight (out, in), bias (out,)."""
from __future__ import annotations

from gpunet import init as initialisers
from gpunet.backend import Array, ops_for
from gpunet.backend import activations, precision
from gpunet.layers.activations import Activation
from gpunet.layers.base import Layer, register
from gpunet.layers.checks import check_float_input, check_last_dim


@register("Dense")
class Dense(Layer):
    """y = x W^T + b over the last axis of x, optionally followed by a fused activation.

    init: "torch_default" (uniform +-1/sqrt(in), as torch.nn.Linear) or any initialiser of
    gpunet.init, scaled for `activation` (or for `init_activation` when the activation is a
    separate layer). Biases start at zero except under torch_default.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: str | None = None, init: str = "torch_default",
                 init_activation: str | None = None):
        super().__init__(in_features=in_features, out_features=out_features, bias=bias,
                         activation=activation, init=init, init_activation=init_activation)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Dense: sizes must be positive, got in={in_features}, out={out_features}")
        shape = (out_features, in_features)
        self.add_param("weight", initialisers.initialise(init, shape, init_activation or activation))
        if bias:
            self.add_param("bias", initialisers.bias(init, in_features, out_features))
        self.activation = activation

    def describe(self) -> str:
        c = self.config
        act = f", activation={self.activation!r}" if self.activation else ""
        return f"Dense({c['in_features']}, {c['out_features']}, bias={c['bias']}{act})"

    def absorbs(self, following) -> bool:
        return self.activation is None and len(following) == 1 and isinstance(following[0], Activation)

    def forward_absorbing(self, x, following):
        return self._forward(x, following[0].kind)

    def forward(self, x: Array) -> Array:
        return self._forward(x, self.activation)

    def _forward(self, x, activation):
        w = self.params["weight"]
        check_last_dim(self, x, w.shape[1])
        check_float_input(self, x, w.dtype, sixteen_bit_copy=True)
        ops = ops_for(x, w, op="Dense.forward")
        # mixed precision: x's 16-bit copy, which the backward keeps for dW's product, is the product's operand
        # too (one cast for both; fp32: x itself)
        x2 = ops.store_16bit(x.reshape(-1, w.shape[1]))
        b = self.params.get("bias")
        if activations.from_output(activation):  # fused: the derivative reads y alone
            y = z = ops.linear(x2, w, b, activation)
        else:  # the derivative needs the pre-activation
            z = ops.linear(x2, w, b)
            y = ops.activation(activation, z)
        if precision.current() == "fp32":
            self.save_for_backward(x=x2, z=z, y=y, activation=activation)
        else:  # mixed precision: x only for dW's product, 16 bits; the activation's input in docs/precision.md
            self.save_for_backward(x=x2, **_kept_for_derivative(ops, activation, z, y),
                                   activation=activation)
        return y.reshape(*x.shape[:-1], w.shape[0])

    def backprop(self, dy, saved, need_dx):
        w = self.params["weight"]
        ops = ops_for(dy, w, op="Dense.backward")
        y = saved.y  # (ReLU's output, kept in 16 bits in mixed precision: linear_act_backward reads it so)
        z = y if saved.z is None else saved.z
        if self.frozen:  # its parameters are not trained: dx alone, without the dW and db GEMMs
            y = ops.stored_float32(y)
            z = y if saved.z is None else saved.z
            dy2 = dy.reshape(-1, w.shape[0])
            dz = dy2 if saved.activation is None else ops.activation_backward(saved.activation, z, y, dy2)
            dz, w = ops.gemm_operands(dz, w)
            return (dz @ w).reshape(*dy.shape[:-1], w.shape[1]) if need_dx else None
        dx = ops.linear_act_backward(saved.x, w, z, y, dy.reshape(-1, w.shape[0]), saved.activation,
                                     self.grads["weight"], self.grads.get("bias"), need_dx)
        return None if dx is None else dx.reshape(*dy.shape[:-1], w.shape[1])


def _kept_for_derivative(ops, activation, z, y) -> dict:
    """What the activation's derivative reads, as a mixed-precision Dense keeps it (z None: the derivative
    reads y in its place): nothing without an activation; ReLU's output in 16 bits (its derivative reads
    only the sign, which rounding keeps: a value too small for fp16 flushes to 0, as the next product's
    rounded operand does); sigmoid's and tanh's output and GELU's input in float32 (their derivatives
    would carry the 16-bit rounding error)."""
    if activation is None:
        return {"z": None, "y": None}
    if activation == "relu":
        return {"z": None, "y": ops.store_16bit(y, hand_on=True)}  # (the next Dense may keep the same copy)
    if activations.from_output(activation):
        return {"z": None, "y": y}
    return {"z": z, "y": None}
