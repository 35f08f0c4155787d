"""1-D convolution on (N, C, L) arrays, torch.nn.Conv1d: weight (out, in, k), bias (out,).

Written against the array module alone, so the same code runs on NumPy and on CuPy:
cols = im2col(x), one row per output position and tap j reading x[j*dilation + o*stride];
y = cols W^T + b is one GEMM. Backward: dW = dY^T cols, db = sum dY, dX = col2im(dY W).
"""
from __future__ import annotations

from gpunet import init as initialisers
from gpunet.backend import Array, ops_for
from gpunet.layers.base import Layer, register
from gpunet.layers.checks import check_channels_first


@register("Conv1D")
class Conv1D(Layer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = True):
        if min(in_channels, out_channels, kernel_size, stride, dilation) < 1 or padding < 0:
            raise ValueError(f"Conv1D: sizes, stride and dilation must be positive and padding >= 0, got "
                             f"{in_channels}, {out_channels}, {kernel_size}, {stride}, {padding}, {dilation}")
        super().__init__(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                         stride=stride, padding=padding, dilation=dilation, bias=bias)
        self.add_param("weight", initialisers.torch_default((out_channels, in_channels, kernel_size)))
        if bias:
            self.add_param("bias", initialisers.bias("torch_default", in_channels * kernel_size, out_channels))

    def forward(self, x: Array) -> Array:
        w = self.params["weight"]
        check_channels_first(self, x, w.shape[1], w.dtype, "(N, C, L)")
        ops = ops_for(x, w, op="Conv1D.forward")  # the NumPy or the CuPy ops, as x and w are
        cols = self._im2col(ops.xp, x)  # (N*OL, C*k): one row per output position
        y = ops.linear(cols, w.reshape(w.shape[0], -1), self.params.get("bias"))  # (N*OL, out)
        self.save_for_backward(cols=cols, x_shape=x.shape)
        return ops.xp.ascontiguousarray(y.reshape(x.shape[0], -1, w.shape[0]).transpose(0, 2, 1))

    def backprop(self, dy, saved, need_dx):
        w = self.params["weight"]
        ops = ops_for(dy, w, op="Conv1D.backward")
        out = w.shape[0]
        dy2 = ops.xp.ascontiguousarray(dy.transpose(0, 2, 1)).reshape(-1, out)  # rows in cols' (n, o) order
        dcols = ops.linear_backward(saved.cols, w.reshape(out, -1), dy2, self.grads["weight"].reshape(out, -1),
                                    self.grads.get("bias"), need_dx)
        return None if dcols is None else self._col2im(ops.xp, dcols, saved.x_shape)

    def _taps(self, length: int):
        """The output length and, per tap j, the slice of the padded input it reads."""
        c = self.config
        k, s, p, d = c["kernel_size"], c["stride"], c["padding"], c["dilation"]
        out = (length + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 1:
            raise ValueError(f"{self.describe()}: input length {length} is shorter than the kernel's reach "
                             f"{d * (k - 1) + 1} (padding {p})")
        return out, [slice(j * d, j * d + s * (out - 1) + 1, s) for j in range(k)]

    def _im2col(self, xp, x):
        n, c, length = x.shape
        out, taps = self._taps(length)
        p = self.config["padding"]
        padded = xp.pad(x, ((0, 0), (0, 0), (p, p))) if p else x
        cols = xp.empty((n, out, c, len(taps)), dtype=x.dtype)
        for j, window in enumerate(taps):
            cols[:, :, :, j] = padded[:, :, window].transpose(0, 2, 1)
        return cols.reshape(n * out, c * len(taps))

    def _col2im(self, xp, dcols, x_shape):
        """The adjoint of _im2col: every column adds back into the input position it read."""
        n, c, length = x_shape
        out, taps = self._taps(length)
        p = self.config["padding"]
        dcols = dcols.reshape(n, out, c, len(taps))
        padded = xp.zeros((n, c, length + 2 * p), dtype=dcols.dtype)
        for j, window in enumerate(taps):
            padded[:, :, window] += dcols[:, :, :, j].transpose(0, 2, 1)
        return padded[:, :, p : p + length]
