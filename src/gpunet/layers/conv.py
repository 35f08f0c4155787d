"""2-D convolution and pooling on NCHW arrays, computed through im2col and one GEMM.

Forward: cols = im2col(x) with one row per output pixel; y = cols W^T + b.
Backward: dW = dY^T cols, db = sum dY, dX = col2im(dY W) (col2im is the adjoint of im2col).
"""
from __future__ import annotations

from types import SimpleNamespace

from gpunet import init as initialisers
from gpunet.backend import Array, ops_for
from gpunet.backend import activations
from gpunet.backend.ops import pooled_size
from gpunet.layers.activations import Activation
from gpunet.layers.base import Layer, register
from gpunet.layers.checks import check_channels_first, check_ndim


def pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def check_window(layer, x, kernel, stride, padding) -> tuple[int, int]:
    out = pooled_size(x.shape[2:], kernel, stride, padding)
    if min(out) < 1:
        raise ValueError(f"{layer.describe()}: input {x.shape[2]}x{x.shape[3]} is smaller than the "
                         f"{kernel[0]}x{kernel[1]} window (padding {padding[0]}x{padding[1]})")
    return out


@register("Conv2D")
class Conv2D(Layer):
    """torch.nn.Conv2d: weight (out, in, kh, kw), bias (out,), zero padding, NCHW."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 init: str = "torch_default", init_activation: str | None = None):
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                         stride=stride, padding=padding, bias=bias, init=init, init_activation=init_activation)
        self.kernel, self.stride, self.padding = pair(kernel_size), pair(stride), pair(padding)
        shape = (out_channels, in_channels, *self.kernel)
        self.add_param("weight", initialisers.initialise(init, shape, init_activation))
        if bias:
            fan_in = in_channels * self.kernel[0] * self.kernel[1]
            self.add_param("bias", initialisers.bias(init, fan_in, out_channels))

    def describe(self) -> str:
        c = self.config
        return (f"Conv2D({c['in_channels']}, {c['out_channels']}, kernel_size={c['kernel_size']}, "
                f"stride={c['stride']}, padding={c['padding']})")

    def absorbs(self, following) -> bool:
        """An activation whose derivative reads its output (relu, sigmoid, tanh); after a ReLU also
        a MaxPool2D whose windows do not overlap (stride = kernel), as in LeNet."""
        first = following[0]
        if not isinstance(first, Activation) or not activations.from_output(first.kind):
            return False
        if len(following) == 1:
            return True
        pool = following[1]
        return (len(following) == 2 and first.kind == "relu" and type(pool) is MaxPool2D
                and pool.stride == pool.kernel)

    def forward_absorbing(self, x, following):
        if len(following) == 1:
            return self._forward(x, following[0].kind)
        w, pool = self.params["weight"], following[1]
        self._check_input(x)
        conv_shape = (*x.shape[:2], *pooled_size(x.shape[2:], self.kernel, self.stride, self.padding))
        check_window(pool, SimpleNamespace(shape=conv_shape), pool.kernel, pool.stride, (0, 0))  # as its forward would
        ops = ops_for(x, w, op="Conv2D.forward")
        y, argmax, cols, y_shape = ops.conv2d_relu_pool(x, w, self.params.get("bias"), self.stride, self.padding,
                                                        pool.kernel)
        # the backward reads only the sign of the pooled ReLU outputs: 16 bits in mixed precision, as a ReLU's
        self.save_for_backward(cols=cols, x_shape=x.shape, pooled=ops.store_16bit(y, hand_on=True), argmax=argmax,
                               y_shape=y_shape, pool=pool.kernel)
        return y

    def forward(self, x: Array) -> Array:
        return self._forward(x, None)

    def _check_input(self, x) -> None:
        check_channels_first(self, x, self.params["weight"].shape[1], self.params["weight"].dtype, "(N, C, H, W)")
        check_window(self, x, self.kernel, self.stride, self.padding)

    def _forward(self, x, activation):
        w = self.params["weight"]
        self._check_input(x)
        ops = ops_for(x, w, op="Conv2D.forward")
        y, cols = ops.conv2d(x, w, self.params.get("bias"), self.stride, self.padding, activation)
        # cols: 16-bit in mixed precision (the ops keep them so); y, for the activation's derivative, as Dense keeps it
        kept = ops.store_16bit(y, hand_on=True) if activation == "relu" else y if activation else None
        self.save_for_backward(cols=cols, x_shape=x.shape, activation=activation, y=kept)
        return y

    def backprop(self, dy, saved, need_dx):
        w = self.params["weight"]
        ops = ops_for(dy, w, op="Conv2D.backward")
        if hasattr(saved, "pool"):  # fused with a ReLU and a MaxPool2D
            return ops.conv2d_relu_pool_backward(dy, ops.stored_float32(saved.pooled), saved.argmax, saved.cols,
                                                 saved.x_shape, saved.y_shape, w, self.grads["weight"],
                                                 self.grads.get("bias"), self.stride, self.padding, saved.pool, need_dx)
        return ops.conv2d_backward(dy, saved.cols, saved.x_shape, w, self.grads["weight"], self.grads.get("bias"),
                                   self.stride, self.padding, need_dx, saved.activation, saved.y)  # (y: maybe 16 bits)


class _Pool(Layer):
    def __init__(self, kernel_size, stride=None):
        super().__init__(kernel_size=kernel_size, stride=stride)
        self.kernel = pair(kernel_size)
        self.stride = pair(stride) if stride is not None else self.kernel

    def _check(self, x):
        check_ndim(self, x, (4,), "(N, C, H, W)")
        check_window(self, x, self.kernel, self.stride, (0, 0))
        return ops_for(x, op=f"{type(self).__name__}.forward")


@register("MaxPool2D")
class MaxPool2D(_Pool):
    """torch.nn.MaxPool2d without padding: the gradient goes to the first maximum of each window."""

    def forward(self, x: Array) -> Array:
        y, argmax = self._check(x).max_pool(x, self.kernel, self.stride)
        self.save_for_backward(argmax=argmax, x_shape=x.shape)
        return y

    def backprop(self, dy, saved, need_dx):
        ops = ops_for(dy, op="MaxPool2D.backward")
        return ops.max_pool_backward(dy, saved.argmax, saved.x_shape, self.kernel, self.stride)


@register("AvgPool2D")
class AvgPool2D(_Pool):
    """torch.nn.AvgPool2d without padding."""

    def forward(self, x: Array) -> Array:
        y = self._check(x).avg_pool(x, self.kernel, self.stride)
        self.save_for_backward(x_shape=x.shape)
        return y

    def backprop(self, dy, saved, need_dx):
        return ops_for(dy, op="AvgPool2D.backward").avg_pool_backward(dy, saved.x_shape, self.kernel, self.stride)
